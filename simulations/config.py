"""A study, declared in TOML and validated into pydantic models.

A study file has four parts (every key is documented in ``simulations/studies/README.md``)::

    [study]                      # what to run
    name = "heart"
    methods = ["local", "centralized", "federated", "hybrid"]
    epsilons = [0.5, 1, 2, 4, 8, inf]     # each site's budget; inf = no noise
    seeds = [0, 1, 2]

    [missingness]                # how ground-truth cells are hidden
    mechanism = "one_attribute"  # or "mcar", "mar", "mnar"
    rate = 0.05

    [[datasets]]                 # one or more federations
    name = "heart"
    path = "../shared/datasets/heart"     # a CSV file or a folder of per-site CSVs
    [datasets.partition]
    kind = "natural"             # one file per site

    [bounds]                     # public per-column bounds (required by private methods)
    age = [0, 120]

Relative paths are resolved against the *project root* of the study file: the nearest
folder at or above the TOML file's folder that holds a ``pyproject.toml``; if there is
none, the TOML file's own folder. ``[study] base_dir`` overrides this (itself relative
to the TOML file's folder). So ``simulations/studies/heart.toml`` in this repository
reads ``../shared/datasets/heart`` as ``<repo>/../shared/datasets/heart``.

Every problem is a :class:`StudyConfigError` whose message names the file and the key
(``datasets[0].partition.sites: ...``).
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from fediim.errors import StudyConfigError
from fediim.io.validation import format_validation_error

__all__ = [
    "BASELINES",
    "METHODS",
    "PRIVATE_METHODS",
    "DatasetConfig",
    "DownstreamConfig",
    "MissingnessConfig",
    "PartitionConfig",
    "Study",
    "StudyConfig",
    "StudyConfigError",
    "StudySection",
    "eps_key",
    "load_study",
    "study_from_dict",
]

#: fediim methods that fit one private model bank per (dataset, seed, epsilon); they are
#: post-processing of that one bank, so each site's budget is spent once for all of them.
PRIVATE_METHODS: tuple[str, ...] = ("federated", "hybrid", "federated_mean")
#: Baselines; ``<name>`` pools every site's (masked) rows (not private), ``<name>_local``
#: runs on each site alone (nothing shared).
BASELINES: tuple[str, ...] = ("knn", "mean", "mice", "missforest")
METHODS: tuple[str, ...] = (
    "local", "centralized", *PRIVATE_METHODS, *BASELINES, *(f"{b}_local" for b in BASELINES)
)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _epsilon(v: Any) -> float:
    if isinstance(v, str) and v.strip().lower() in ("inf", "+inf", "infinity", "∞"):
        return math.inf
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"expected a number > 0 or inf, got {v!r}")
    f = float(v)
    if math.isnan(f) or f <= 0:
        raise ValueError(f"expected a number > 0 or inf, got {v!r}")
    return f


def eps_key(eps: float | None) -> str | None:
    """Text key of an epsilon: ``"0.5"``, ``"1"``, ``"inf"``; None for non-private cells."""
    if eps is None:
        return None
    return "inf" if math.isinf(eps) else f"{eps:g}"


class StudySection(_Model):
    """``[study]``: what to run."""

    name: str = Field(min_length=1)
    title: str | None = None
    description: str = ""
    methods: list[str] = Field(min_length=1)
    epsilons: list[float] = Field(default_factory=list)
    delta: float = Field(1e-6, gt=0, lt=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    k: int = Field(10, ge=1)
    #: how the private methods' sites release: see FederatedIIM's ``aggregation``
    aggregation: Literal["auto", "secure", "per-site"] = "auto"
    report_epsilon: float | None = None
    base_dir: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"expected letters, digits, '_', '.', '-' (used in file names), "
                             f"got {v!r}")
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        for i, m in enumerate(v):
            if m not in METHODS:
                raise ValueError(f"[{i}]: unknown method {m!r}; expected one of "
                                 f"{', '.join(METHODS)}")
        if len(set(v)) != len(v):
            raise ValueError("a method is listed twice")
        return v

    @field_validator("epsilons", mode="before")
    @classmethod
    def _epsilons(cls, v: Any) -> Any:
        if not isinstance(v, list):
            raise ValueError("expected a list of numbers > 0 (inf allowed), e.g. [1, 4, inf]")
        out: list[float] = []
        for i, e in enumerate(v):
            try:
                out.append(_epsilon(e))
            except ValueError as exc:
                raise ValueError(f"[{i}]: {exc}") from None
        return sorted(set(out))

    @field_validator("report_epsilon", mode="before")
    @classmethod
    def _report_eps(cls, v: Any) -> Any:
        return None if v is None else _epsilon(v)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if any(s < 0 for s in v) or len(set(v)) != len(v):
            raise ValueError("expected distinct integers >= 0")
        return v


class PartitionConfig(_Model):
    """``[datasets.partition]``: how a dataset's rows are split into sites."""

    kind: Literal["natural", "iid", "size_skew", "dirichlet", "sorted"] = "natural"
    sites: int | None = Field(None, ge=2)
    sizes: list[float] | None = None
    rows: list[StrictInt] | None = None
    column: str | None = None
    alpha: float = Field(0.5, gt=0)
    bins: int = Field(4, ge=2)
    min_rows: int = Field(10, ge=1)
    seed_offset: int = Field(10_000, ge=0)
    site_names: list[str] | None = None

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (len(v) < 2 or any(not (s > 0 and math.isfinite(s)) for s in v)):
            raise ValueError("expected at least two positive fractions, e.g. [0.4, 0.3, 0.2, 0.1]")
        return v

    @field_validator("rows")
    @classmethod
    def _rows(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) < 2 or any(r < 1 for r in v)):
            raise ValueError("expected at least two row counts >= 1 that sum to the dataset's "
                             "rows, e.g. [150, 3000, 3000, 3418]")
        return v


class ColumnLevels(_Model):
    """``[datasets.levels] name = {kind = ..., levels = [...]}``: a coded column, imputed
    as one of its declared (public) levels."""

    kind: Literal["binary", "categorical", "ordinal"]
    levels: list[float] = Field(min_length=2)

    @model_validator(mode="after")
    def _check(self) -> ColumnLevels:
        if len(set(self.levels)) != len(self.levels):
            raise ValueError(f"expected distinct levels, got {self.levels}")
        if self.kind == "binary" and len(self.levels) != 2:
            raise ValueError(f"a binary column has exactly 2 levels, got {self.levels}")
        return self


class DatasetConfig(_Model):
    """``[[datasets]]``: one federation (its data, its split into sites)."""

    name: str = Field(min_length=1)
    path: str | None = None
    builtin: Literal["diabetes"] | None = None
    files: list[str] | None = None
    columns: list[str] | None = None
    drop_columns: list[str] = Field(default_factory=list)
    missing_codes: dict[str, list[float]] = Field(default_factory=dict)
    missing_markers: list[str] | None = None
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    bounds: dict[str, tuple[float, float]] = Field(default_factory=dict)
    absent: dict[str, list[str]] = Field(default_factory=dict)
    #: Columns holding codes (binary or categorical values): private clipping never
    #: narrows them (a noisy quantile between two codes would clamp half the records).
    code_columns: list[str] = Field(default_factory=list)
    #: Coded columns with their kind and declared levels: every method imputes them as
    #: levels (fediim's engines natively, the baselines rounded to the nearest level, the
    #: mean as the mode) and the study reports their accuracy.
    levels: dict[str, ColumnLevels] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return StudySection._name(v)

    @field_validator("absent")
    @classmethod
    def _absent(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for site, cols in v.items():
            if not cols or len(set(cols)) != len(cols):
                raise ValueError(f"{site}: expected a non-empty list of distinct column names "
                                 f"that the site never measures, got {cols}")
        return v

    @field_validator("bounds")
    @classmethod
    def _bounds(cls, v: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        return _check_bounds(v)


class MissingnessConfig(_Model):
    """``[missingness]``: which observed cells are hidden (and then scored)."""

    mechanism: Literal["one_attribute", "mcar", "mar", "mnar"] = "one_attribute"
    rate: float = Field(0.05, gt=0, lt=1)
    columns: list[str] | None = None
    driver: str | None = None
    strength: float = 2.0
    site_rates: dict[str, float] = Field(default_factory=dict)
    #: per named site, its own mechanism, rate and the rest (the other sites keep this
    #: section's); drawn on that site alone
    sites: dict[str, MissingnessConfig] = Field(default_factory=dict)

    @field_validator("site_rates")
    @classmethod
    def _site_rates(cls, v: dict[str, float]) -> dict[str, float]:
        for site, r in v.items():
            if not 0 < r < 1:
                raise ValueError(f"{site}: expected a fraction between 0 and 1 (exclusive), "
                                 f"got {r}")
        return v


class DownstreamConfig(_Model):
    """``[downstream]``: a regression fitted on every imputed federation (rows pooled), and
    the coefficient whose bias and interval coverage are reported, single against
    multiple imputation."""

    model: Literal["linear", "logistic"] = "linear"
    target: str = Field(min_length=1)
    #: logistic: the positive class is ``target > threshold`` (None: the target is 0/1)
    threshold: float | None = None
    #: the regressors (default: every other column)
    features: list[str] | None = None
    coefficient: str = Field(min_length=1)
    #: M of the multiple-imputation arm
    n_imputations: int = Field(5, ge=2, le=100)


def _check_bounds(v: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    for col, (lo, hi) in v.items():
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"{col}: expected [lo, hi] with finite lo < hi, got [{lo}, {hi}]")
    return v


class StudyConfig(_Model):
    """The whole study file."""

    study: StudySection
    missingness: MissingnessConfig = Field(default_factory=MissingnessConfig)
    datasets: list[DatasetConfig] = Field(min_length=1)
    bounds: dict[str, tuple[float, float]] = Field(default_factory=dict)
    downstream: DownstreamConfig | None = None

    @field_validator("bounds")
    @classmethod
    def _bounds(cls, v: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        return _check_bounds(v)


@dataclass(frozen=True)
class Study:
    """A validated study: the config, where it came from, and the folder paths resolve in."""

    config: StudyConfig
    source: str
    base_dir: Path

    @property
    def name(self) -> str:
        return self.config.study.name

    @property
    def private_methods(self) -> list[str]:
        return [m for m in self.config.study.methods if m in PRIVATE_METHODS]

    @property
    def public_methods(self) -> list[str]:
        return [m for m in self.config.study.methods if m not in PRIVATE_METHODS]

    def resolve(self, path: str) -> Path:
        p = Path(os.path.expanduser(path))
        return p if p.is_absolute() else (self.base_dir / p)

    def bounds_for(self, ds: DatasetConfig) -> dict[str, tuple[float, float]]:
        """Study-wide bounds overridden by the dataset's own."""
        return {**self.config.bounds, **ds.bounds}

    def replace(self, *, methods: list[str] | None = None,
                epsilons: list[float] | None = None, seeds: list[int] | None = None,
                datasets: list[str] | None = None) -> Study:
        """This study with other methods, epsilons or seeds, or only the named datasets
        (e.g. a quick check on one seed); validated like the file itself."""
        raw = self.config.model_dump()
        changes = {"methods": methods, "epsilons": epsilons, "seeds": seeds}
        raw["study"].update({k: v for k, v in changes.items() if v is not None})
        raw["study"]["base_dir"] = None  # already applied to self.base_dir
        if datasets is not None:
            unknown = [n for n in datasets if n not in [d["name"] for d in raw["datasets"]]]
            if unknown:
                raise StudyConfigError(f"{self.source}: no dataset named "
                                       f"{', '.join(map(repr, unknown))}")
            raw["datasets"] = [d for d in raw["datasets"] if d["name"] in datasets]
        return study_from_dict(raw, self.source, self.base_dir)

    @property
    def report_epsilon(self) -> float | None:
        s = self.config.study
        if s.report_epsilon is not None:
            return s.report_epsilon
        finite = [e for e in s.epsilons if math.isfinite(e)]
        if 1.0 in finite:
            return 1.0
        return finite[0] if finite else (s.epsilons[0] if s.epsilons else None)


# -- loading ------------------------------------------------------------------------------
def _project_root(folder: Path) -> Path:
    for d in (folder, *folder.parents):
        if (d / "pyproject.toml").is_file():
            return d
    return folder


class _Fail:
    """Raises the :class:`StudyConfigError` of one key of one study file."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __call__(self, key: str, msg: str) -> None:
        raise StudyConfigError(f"{self.source}: invalid study: {key}: {msg}")


def _cross_checks(cfg: StudyConfig, source: str) -> None:
    """Checks that span several keys (each error names the key to change)."""
    fail = _Fail(source)
    s = cfg.study
    private = [m for m in s.methods if m in PRIVATE_METHODS]
    if private and not s.epsilons:
        fail("study.epsilons", f"required by the private method(s) {', '.join(private)}: "
                               "a list of per-site budgets, e.g. [1, 4, inf]")
    if s.report_epsilon is not None and s.report_epsilon not in s.epsilons:
        fail("study.report_epsilon", f"{eps_key(s.report_epsilon)} is not in study.epsilons")
    names = [d.name for d in cfg.datasets]
    for i, d in enumerate(cfg.datasets):
        if names.count(d.name) > 1:
            fail(f"datasets[{i}].name", f"{d.name!r} is used by more than one dataset")
        _check_dataset(d, f"datasets[{i}]", fail)
    _check_missingness(cfg.missingness, fail)
    for site, own in cfg.missingness.sites.items():
        if own.sites or own.site_rates:
            fail(f"missingness.sites.{site}", "a site's own missingness cannot name sites")
        _check_missingness(own, fail, f"missingness.sites.{site}")
    if cfg.downstream is not None:
        _check_downstream(cfg.downstream, fail)


def _check_downstream(d: DownstreamConfig, fail: _Fail) -> None:
    features = d.features
    if features is not None and (not features or len(set(features)) != len(features)):
        fail("downstream.features", "expected a non-empty list of distinct column names")
    if d.target in (features or []):
        fail("downstream.features", f"the target {d.target!r} cannot also be a regressor")
    if d.coefficient == d.target or (features is not None and d.coefficient not in features):
        fail("downstream.coefficient", f"{d.coefficient!r} must be one of the regressors "
                                       "(downstream.features, default: every column but "
                                       "the target)")
    if d.model == "linear" and d.threshold is not None:
        fail("downstream.threshold", "only used with model = 'logistic'")


def _check_dataset(d: DatasetConfig, key: str, fail: _Fail) -> None:
    if (d.path is None) == (d.builtin is None):
        fail(f"{key}.path", "give exactly one of path (a CSV file or a folder of per-site "
                            "CSVs) and builtin (\"diabetes\")")
    if d.files is not None and d.path is None:
        fail(f"{key}.files", "only with path = a folder")
    p = d.partition
    pk = f"{key}.partition"
    if p.kind in ("iid", "dirichlet", "sorted") and p.sites is None:
        fail(f"{pk}.sites", f"required for kind = {p.kind!r} (the number of sites)")
    if p.kind == "size_skew":
        _check_size_skew(p, pk, fail)
    else:
        for k in ("sizes", "rows"):
            if getattr(p, k) is not None:
                fail(f"{pk}.{k}", "only used with kind = 'size_skew'")
    if p.kind in ("dirichlet", "sorted") and p.column is None:
        fail(f"{pk}.column", f"required for kind = {p.kind!r} (the column that drives the "
                             "skew)")
    if p.kind == "iid" and p.column is not None:
        fail(f"{pk}.column", "not used with kind = 'iid'")
    if p.kind == "natural" and p.sites is not None:
        fail(f"{pk}.sites", "kind = 'natural' takes its sites from the data (one file per "
                            "site, or one value of partition.column per site)")


def _check_size_skew(p: PartitionConfig, pk: str, fail: _Fail) -> None:
    """``size_skew`` takes either ``sizes`` (shares) or ``rows`` (exact counts)."""
    if (p.sizes is None) == (p.rows is None):
        fail(f"{pk}.sizes", "kind = 'size_skew' needs exactly one of sizes (each site's "
                            "share of the rows, e.g. [0.4, 0.3, 0.2, 0.1]) and rows (each "
                            "site's exact row count, e.g. [150, 3000, 3000, 3418])")
    n = len(p.sizes if p.sizes is not None else p.rows or [])
    if p.sites is not None and p.sites != n:
        key = "sizes" if p.sizes is not None else "rows"
        fail(f"{pk}.sites", f"{p.sites} sites but {n} {key}")


def _check_missingness(m: MissingnessConfig, fail: _Fail, key: str = "missingness") -> None:
    if m.site_rates and m.mechanism != "one_attribute":
        fail(f"{key}.site_rates", "only used with mechanism = 'one_attribute' (the other "
                                  "mechanisms draw over the federation as a whole)")
    if m.mechanism == "mar" and m.driver is None:
        fail(f"{key}.driver", "required for mechanism = 'mar': the observed column whose "
                              "value drives the probability of missingness")
    if m.mechanism != "mar" and m.driver is not None:
        fail(f"{key}.driver", "only used with mechanism = 'mar'")
    if m.mechanism == "mnar" and not m.strength > 0:
        fail(f"{key}.strength", "must be > 0 for 'mnar' (larger values more often missing)")
    if m.mechanism == "mar" and (m.strength == 0 or not math.isfinite(m.strength)):
        fail(f"{key}.strength", "must be a finite non-zero number")
    if m.mechanism == "mar" and m.columns is not None and m.driver in m.columns:
        fail(f"{key}.columns", f"the driver column {m.driver!r} cannot also be masked")


def study_from_dict(raw: dict[str, Any], source: str = "<study>",
                    base_dir: str | os.PathLike[str] | None = None) -> Study:
    """Validate a study given as a dict (the parsed TOML). Paths resolve in ``base_dir``
    (default: the current folder)."""
    try:
        cfg = StudyConfig.model_validate(raw)
    except ValidationError as exc:
        raise StudyConfigError(format_validation_error(exc, f"{source}: invalid study")) from None
    _cross_checks(cfg, source)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    if cfg.study.base_dir is not None:
        base = base / cfg.study.base_dir
    return Study(cfg, source, base.resolve())


def load_study(path: str | os.PathLike[str]) -> Study:
    """Read and validate a study TOML file."""
    p = Path(path)
    source = os.fspath(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StudyConfigError(f"{source}: no such study file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise StudyConfigError(f"{source}: cannot read: {exc}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise StudyConfigError(f"{source}: not valid TOML: {exc}") from None
    folder = p.resolve().parent
    base = folder if isinstance(raw.get("study"), dict) and "base_dir" in raw["study"] \
        else _project_root(folder)
    return study_from_dict(raw, source, base)
