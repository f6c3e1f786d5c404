"""Datasets and partitioners: from a study's ``[[datasets]]`` entry to a list of site tables.

Sources
    path = a CSV file            one table, split by ``partition``
    path = a folder              one CSV per site (``files`` lists them in order; default:
                                 every ``*.csv`` in name order); with a partition other
                                 than ``natural`` the files are stacked first
    builtin = "diabetes"         scikit-learn's diabetes table (442 x 10, unscaled),
                                 shipped with scikit-learn

Every CSV needs a header row and is read by ``fediim.io.table.read_csv``; an empty field
(or NA, NaN, nan, ?; ``missing_markers`` replaces these) is missing. Then, in
this order: the natural-partition column is taken out (if any), ``drop_columns`` are
dropped, ``columns`` (if given) selects and orders the rest, and ``missing_codes`` turn
coded values into missing (UCI Heart's ``chol = 0``).

Partitions (``seed`` is the study seed; random ones use ``default_rng(seed_offset + seed)``)
    natural      one site per file, or one site per value of ``column`` (a single table)
    iid          a random permutation cut into ``sites`` near-equal parts
    size_skew    a random permutation cut at the cumulative ``sizes`` fractions, or into
                 exactly ``rows`` rows per site (the counts must sum to the dataset's rows)
    dirichlet    label/feature skew on ``column``: its values are classes (or ``bins``
                 quantile bins when it has more distinct values); each class is spread over
                 the sites by proportions drawn from Dirichlet(``alpha``) -- small alpha,
                 strong skew. Redrawn (up to 100 times) until every site has ``min_rows``.
    sorted       rows sorted by ``column`` and cut into ``sites`` contiguous blocks (the
                 most extreme feature skew: each site sees one range of the column)

``absent`` (``{site = [columns]}``) names columns a site never measures. The federation
keeps their true values; :func:`simulations.missingness.hide_cells` hides them before any
other masking, and they are scored on their own (``simulations.methods.score``).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fediim.errors import DataError
from fediim.io.schema import DEFAULT_MISSING
from fediim.io.table import read_csv
from simulations.config import DatasetConfig, PartitionConfig, Study, StudyConfigError

__all__ = [
    "DEFAULT_MISSING_MARKERS",
    "Federation",
    "RawData",
    "load_raw",
    "make_federation",
    "partition_rows",
]

DEFAULT_MISSING_MARKERS: tuple[str, ...] = DEFAULT_MISSING


class DataLoadError(StudyConfigError):
    """A dataset could not be read or does not fit the study (names file, line, column)."""


@dataclass(frozen=True)
class RawData:
    """A dataset before partitioning: tables (one per file) over the same columns."""

    name: str
    columns: list[str]
    tables: list[np.ndarray]
    table_names: list[str]
    labels: list[np.ndarray] | None  # natural partition by column: the column, per table
    fingerprint: str                 # sha256 of the source bytes + preprocessing


@dataclass(frozen=True)
class Federation:
    """Sites holding disjoint rows over one schema."""

    name: str
    columns: list[str]
    site_names: list[str]
    sites: list[np.ndarray]
    bounds: np.ndarray | None   # (m, 2) public bounds, or None when not all are given
    #: site -> the columns it never measures (``[datasets.absent]``; truth kept in ``sites``)
    absent: dict[str, list[str]] = field(default_factory=dict)
    #: columns holding codes, never narrowed by private clipping (``code_columns``)
    code_columns: list[str] = field(default_factory=list)
    #: coded columns by position: (kind, declared levels) (``[datasets.levels]``)
    kinds: dict[int, tuple[str, tuple[float, ...]]] = field(default_factory=dict)


# -- reading ------------------------------------------------------------------------------
def _read_csv(path: Path, markers: tuple[str, ...]) -> tuple[list[str], np.ndarray, bytes]:
    """fediim's CSV reader (errors name the file, line and column): (columns, values with
    NaN, the file's bytes for the fingerprint). A column may be missing entirely at one
    site (Switzerland never records ``chol``)."""
    try:
        table = read_csv(path, missing_markers=markers, allow_empty_columns=True)
        data = path.read_bytes()
    except DataError as exc:
        raise DataLoadError(str(exc)) from None
    except OSError as exc:
        raise DataLoadError(f"{path}: cannot read: {exc}") from None
    return table.columns, table.values, data


def _builtin(name: str) -> tuple[list[str], np.ndarray, bytes]:
    if name == "diabetes":
        from sklearn.datasets import load_diabetes

        d = load_diabetes(scaled=False)
        x = np.ascontiguousarray(d.data, dtype=np.float64)
        return [str(c) for c in d.feature_names], x, x.tobytes()
    raise DataLoadError(f"unknown builtin dataset {name!r}")  # pragma: no cover


def _ds_key(study: Study, index: int) -> str:
    return f"datasets[{index}] ({study.config.datasets[index].name})"


def load_raw(study: Study, index: int) -> RawData:
    """Read dataset ``index`` of the study and apply its column preprocessing."""
    return _load_raw(study.config.datasets[index], study.base_dir,
                     f"{study.source}: {_ds_key(study, index)}")


#: (table name, its columns, its values) for each file of a dataset
_Tables = list[tuple[str, list[str], np.ndarray]]


def _load_raw(ds: DatasetConfig, base_dir: Path, where: str) -> RawData:
    """Read the dataset's files, then apply its column preprocessing (module doc).
    ``where`` (study file and dataset key) starts every error message."""
    fingerprint = hashlib.sha256()
    tables = _read_sources(ds, base_dir, where, fingerprint)
    first_cols = tables[0][1]
    for tname, cols, _ in tables[1:]:
        if set(cols) != set(first_cols):
            raise DataLoadError(f"{where}: file {tname!r} has columns {cols}, the first "
                                f"file has {first_cols}")
    label_col = _label_column(ds, first_cols, len(tables), where)
    keep = _kept_columns(ds, first_cols, label_col, where)
    out = [_preprocessed(ds, cols, x, keep) for _, cols, x in tables]
    labels = None if label_col is None else [x[:, cols.index(label_col)]
                                             for _, cols, x in tables]
    pre = {k: v for k, v in ds.model_dump().items() if k in (
        "columns", "drop_columns", "missing_codes", "missing_markers", "files")}
    fingerprint.update(json.dumps(pre, sort_keys=True).encode())
    return RawData(ds.name, keep, out, [t[0] for t in tables], labels,
                   fingerprint.hexdigest())


def _read_sources(ds: DatasetConfig, base_dir: Path, where: str, fingerprint: Any
                  ) -> _Tables:
    """The dataset's tables: the builtin one, one CSV file, or a folder of per-site CSVs;
    their bytes enter ``fingerprint``."""
    markers = tuple(ds.missing_markers) if ds.missing_markers is not None \
        else DEFAULT_MISSING_MARKERS
    if ds.builtin is not None:
        cols, x, data = _builtin(ds.builtin)
        fingerprint.update(data)
        return [(ds.builtin, cols, x)]
    assert ds.path is not None
    p = Path(ds.path).expanduser()
    p = p if p.is_absolute() else base_dir / p
    if p.is_file():
        if ds.files is not None:
            raise DataLoadError(f"{where}.files: path {p} is a file, not a folder")
        cols, x, data = _read_csv(p, markers)
        fingerprint.update(data)
        return [(p.stem, cols, x)]
    if not p.is_dir():
        raise DataLoadError(f"{where}.path: {ds.path!r} not found (resolved to {p}; "
                            f"relative paths are taken from {base_dir})")
    tables = []
    for f in _site_files(ds, p, where):
        cols, x, data = _read_csv(f, markers)
        fingerprint.update(f.name.encode() + b"\0" + data)
        tables.append((f.stem, cols, x))
    return tables


def _site_files(ds: DatasetConfig, folder: Path, where: str) -> list[Path]:
    """The per-site CSVs of a folder: ``files`` in order, else every ``*.csv`` by name."""
    if ds.files is None:
        files = sorted(folder.glob("*.csv"))
        if not files:
            raise DataLoadError(f"{where}.path: folder {folder} holds no *.csv files")
        return files
    for i, f in enumerate(ds.files):
        if not (folder / f).is_file():
            raise DataLoadError(f"{where}.files[{i}]: no such file {folder / f}")
    return [folder / f for f in ds.files]


def _need(col: str, columns: list[str], where: str) -> None:
    if col not in columns:
        raise DataLoadError(f"{where}: no column {col!r} in the data (columns: "
                            f"{', '.join(columns)})")


def _label_column(ds: DatasetConfig, columns: list[str], n_tables: int, where: str
                  ) -> str | None:
    """The column naming each row's site (natural partition of a single table), if any."""
    part = ds.partition
    if part.kind != "natural":
        return None
    if part.column is None and n_tables == 1:
        raise DataLoadError(f"{where}.partition.column: kind = 'natural' on a single table "
                            "needs the column whose value names the site (or give path = a "
                            "folder with one CSV per site)")
    if part.column is not None and n_tables > 1:
        raise DataLoadError(f"{where}.partition.column: the folder already has one file per "
                            "site; drop partition.column")
    if part.column is not None:
        _need(part.column, columns, f"{where}.partition.column")
    return part.column


def _kept_columns(ds: DatasetConfig, columns: list[str], label_col: str | None, where: str
                  ) -> list[str]:
    """The columns a study imputes: all but the dropped ones and the site label, or
    ``columns`` (in its order)."""
    for i, c in enumerate(ds.drop_columns):
        _need(c, columns, f"{where}.drop_columns[{i}]")
    keep = [c for c in columns if c not in ds.drop_columns and c != label_col]
    if ds.columns is not None:
        for i, c in enumerate(ds.columns):
            _need(c, columns, f"{where}.columns[{i}]")
            if c not in keep:
                raise DataLoadError(f"{where}.columns[{i}]: {c!r} is dropped")
        keep = list(ds.columns)
    for c in ds.missing_codes:
        if c not in keep:
            raise DataLoadError(f"{where}.missing_codes.{c}: no such column "
                                f"(columns: {', '.join(keep)})")
    if len(keep) < 2:
        raise DataLoadError(f"{where}: at least two columns are needed, got {keep}")
    return keep


def _preprocessed(ds: DatasetConfig, columns: list[str], x: np.ndarray, keep: list[str]
                  ) -> np.ndarray:
    """``x`` reduced to ``keep`` (in order), with ``missing_codes`` turned into NaN."""
    y = x[:, [columns.index(c) for c in keep]].copy()
    for c, codes in ds.missing_codes.items():
        j = keep.index(c)
        y[np.isin(y[:, j], codes), j] = np.nan
    return y


# -- partitioning -------------------------------------------------------------------------
def _dirichlet(values: np.ndarray, n_sites: int, alpha: float, bins: int, min_rows: int,
               rng: np.random.Generator) -> list[np.ndarray]:
    v = np.where(np.isnan(values), np.nanmedian(values), values)
    uniq = np.unique(v)
    if len(uniq) <= bins:
        classes = np.searchsorted(uniq, v)
    else:
        edges = np.quantile(v, np.linspace(0, 1, bins + 1)[1:-1])
        classes = np.searchsorted(edges, v, side="right")
    n = len(v)
    if n < n_sites * min_rows:
        raise ValueError(f"{n} rows cannot give {n_sites} sites of min_rows = {min_rows}")
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(n_sites)]
        for c in np.unique(classes):
            idx = rng.permutation(np.flatnonzero(classes == c))
            p = rng.dirichlet(np.full(n_sites, alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).round().astype(int)
            for s, chunk in enumerate(np.split(idx, cuts)):
                parts[s].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_rows:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"no Dirichlet(alpha = {alpha}) draw in 100 gave every site at least "
                     f"min_rows = {min_rows} rows; raise alpha or lower min_rows")


def partition_rows(n: int, kind: str, seed: int, *, sites: int | None = None,
                   sizes: list[float] | None = None, rows: list[int] | None = None,
                   column: np.ndarray | None = None, alpha: float = 0.5, bins: int = 4,
                   min_rows: int = 10, seed_offset: int = 10_000) -> list[np.ndarray]:
    """Row indices of each site for the random/sorted partitions (see the module doc).

    ``size_skew`` cuts one shuffle at the cumulative ``sizes`` shares, or into exactly
    ``rows`` rows per site (which must sum to ``n``).
    """
    rng = np.random.default_rng(seed_offset + seed)
    if kind == "iid":
        assert sites is not None
        return list(np.array_split(rng.permutation(n), sites))
    if kind == "size_skew":
        if rows is not None:
            if sum(rows) != n:
                raise ValueError(f"rows: the counts sum to {sum(rows)} but the dataset has "
                                 f"{n} rows")
            cuts = np.cumsum(rows)[:-1]
        else:
            assert sizes is not None
            w = np.asarray(sizes, dtype=np.float64)
            cuts = (np.cumsum(w / w.sum())[:-1] * n).round().astype(int)
        return list(np.split(rng.permutation(n), cuts))
    if kind == "sorted":
        assert sites is not None and column is not None
        return list(np.array_split(np.argsort(column, kind="stable"), sites))
    if kind == "dirichlet":
        assert sites is not None and column is not None
        return _dirichlet(column, sites, alpha, bins, min_rows, rng)
    raise ValueError(f"unknown partition kind {kind!r}")


def _natural_names(raw: RawData, values: np.ndarray | None = None) -> list[str]:
    if values is None:
        return list(raw.table_names)
    return [f"{v:g}" for v in values]


def make_federation(study: Study, index: int, seed: int, raw: RawData | None = None
                    ) -> Federation:
    """Dataset ``index`` split into its sites for ``seed``, with its public bounds."""
    ds = study.config.datasets[index]
    raw = raw if raw is not None else load_raw(study, index)
    part = ds.partition
    where = f"{study.source}: {_ds_key(study, index)}"
    if part.kind == "natural":
        sites, names = _natural_sites(raw, part, where)
    else:
        sites, names = _partitioned_sites(raw, part, seed, where)
    if part.site_names is not None:
        if len(part.site_names) != len(sites) or len(set(part.site_names)) != len(sites):
            raise DataLoadError(f"{where}.partition.site_names: {len(sites)} distinct names "
                                f"needed, got {part.site_names}")
        names = list(part.site_names)
    for name, s in zip(names, sites, strict=True):
        if len(s) < 2:
            raise DataLoadError(f"{where}: site {name!r} has {len(s)} row(s)")
    _check_absent(ds, names, raw.columns, where)
    for j, c in enumerate(ds.code_columns):
        _need(c, raw.columns, f"{where}.code_columns[{j}]")
    for c in ds.levels:
        _need(c, raw.columns, f"{where}.levels.{c}")
    kinds = {raw.columns.index(c): (spec.kind, tuple(spec.levels))
             for c, spec in ds.levels.items()}
    bmap = study.bounds_for(ds)
    bounds = None
    if all(c in bmap for c in raw.columns):
        bounds = np.array([bmap[c] for c in raw.columns], dtype=np.float64)
    return Federation(ds.name, list(raw.columns), names, sites, bounds,
                      {s: list(c) for s, c in ds.absent.items()}, list(ds.code_columns), kinds)


def _check_absent(ds: DatasetConfig, site_names: list[str], columns: list[str], where: str
                  ) -> None:
    """``[datasets.absent]`` names real sites and columns, and leaves each site a column."""
    for site, cols in ds.absent.items():
        key = f"{where}.absent.{site}"
        if site not in site_names:
            raise DataLoadError(f"{key}: no site named {site!r} (sites: "
                                f"{', '.join(site_names)}; name them with "
                                "partition.site_names)")
        for j, c in enumerate(cols):
            _need(c, columns, f"{key}[{j}]")
        if len(cols) >= len(columns) - 1:
            raise DataLoadError(f"{key}: a site must keep at least two measured columns, "
                                f"got {len(columns) - len(cols)}")


def _natural_sites(raw: RawData, part: PartitionConfig, where: str
                   ) -> tuple[list[np.ndarray], list[str]]:
    """One site per file, or one per value of the label column (named ``column=value``)."""
    if raw.labels is None:
        return list(raw.tables), _natural_names(raw)
    x, lab = raw.tables[0], raw.labels[0]
    if np.isnan(lab).any():
        raise DataLoadError(f"{where}.partition.column: {part.column!r} is missing in some "
                            "rows")
    vals = np.unique(lab)
    if len(vals) < 2:
        raise DataLoadError(f"{where}.partition.column: {part.column!r} has a single value; "
                            "need >= 2 sites")
    return ([x[lab == v] for v in vals],
            [f"{part.column}={n}" for n in _natural_names(raw, vals)])


def _partitioned_sites(raw: RawData, part: PartitionConfig, seed: int, where: str
                       ) -> tuple[list[np.ndarray], list[str]]:
    """The stacked tables cut by a random or sorted partition (sites ``site0``, ...)."""
    x = np.vstack(raw.tables)
    col = None
    if part.column is not None:
        if part.column not in raw.columns:
            raise DataLoadError(f"{where}.partition.column: no column {part.column!r} "
                                f"(columns: {', '.join(raw.columns)})")
        col = x[:, raw.columns.index(part.column)]
    try:
        idx = partition_rows(len(x), part.kind, seed, sites=part.sites, sizes=part.sizes,
                             rows=part.rows, column=col, alpha=part.alpha, bins=part.bins,
                             min_rows=part.min_rows, seed_offset=part.seed_offset)
    except ValueError as exc:
        raise DataLoadError(f"{where}.partition: {exc}") from None
    return [x[i] for i in idx], [f"site{i}" for i in range(len(idx))]


@functools.lru_cache(maxsize=8)
def _cached_raw(ds_json: str, base_dir: str, where: str) -> RawData:
    return _load_raw(DatasetConfig.model_validate_json(ds_json), Path(base_dir), where)


def cached_raw(study: Study, index: int) -> RawData:
    """:func:`load_raw`, memoised per process (workers load each dataset once)."""
    ds = study.config.datasets[index]
    return _cached_raw(ds.model_dump_json(), str(study.base_dir),
                       f"{study.source}: {_ds_key(study, index)}")
