"""Mixed column kinds for the engines: labels to codes, codes to numeric columns, and back.

The IIM engines regress numbers on numbers, so a table with coded columns (binary,
categorical, ordinal; levels declared as in :mod:`fediim.io.schema`) is *encoded* before
and *decoded* after imputation:

* numeric: the value itself (the engine z-scores it as before);
* ordinal: the level's rank 0, 1, ..., L - 1, z-scored like a number (its order is kept);
* binary: one column, the code 0 or 1;
* categorical with L levels: L indicator columns (one-hot, exactly one is 1).

**Scaling.** Distances compare rows on every observed column at once, numeric columns
z-scored. Indicator columns get a *fixed* scale, whatever the level frequencies: two rows
with different levels are 1 apart in squared distance, as two rows one standard deviation
apart on a numeric attribute. So each one-hot indicator is 1/√2 (a mismatch moves two of
them) and the binary code 1. Their centre is the level frequency, which moves no
distance. (Measured against a mismatch of 2 and of 4 in benchmarks/README.md.)

**Decoding a target.** Each indicator of a categorical target is one numeric target of the
engine: its individual models give per-level scores that candidate-distance voting
combines. The scores are clipped to [0, 1] and normalised into the distribution over the
levels; the imputed value is the most probable level, whose probability is reported, and
the cell's ``uncertainty`` is ``1 - probability`` (the voted chance that another level is
right). A binary target's score is P(second level). An ordinal target's voted rank is
rounded to the nearest level (so the order is kept) and its ``uncertainty`` is the
candidates' spread in ranks. Every imputed coded cell is a declared level.

**Drawing a level.** Multiple imputation keeps each voted cell's whole distribution and
draws the level from it (:func:`draw_levels`, through ``choose`` of :meth:`MixedEncoding.decode`)
instead of taking the most probable one; an ordinal rank drawn as a number is rounded to
the nearest level as above.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fediim.io.result import ImputationResult
from fediim.io.schema import CODED_KINDS, KINDS, TableSchema

__all__ = ["BINARY_SCALE", "INDICATOR_SCALE", "ColumnCoding", "LevelChoice", "MixedEncoding",
           "ReleaseColumns", "codings_from", "draw_levels", "encoded_width", "fit_encoding",
           "level_codes", "most_probable", "release_columns", "schema_encoding",
           "table_codes"]

#: Fixed divisors of the indicator columns (see module): a level mismatch adds 1 to the
#: squared distance, as one standard deviation of a z-scored numeric attribute.
INDICATOR_SCALE: float = math.sqrt(2.0)
BINARY_SCALE: float = 1.0
#: How a voted cell's level is chosen from its distribution over the levels (q, L):
#: the most probable (single imputation) or a draw (multiple imputation).
LevelChoice = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ColumnCoding:
    """One column's kind and, for a coded kind, its declared levels (codes = positions)."""

    kind: str = "numeric"
    levels: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"column kind must be one of {', '.join(KINDS)}; got "
                             f"{self.kind!r}")
        if self.kind == "numeric" and self.levels:
            raise ValueError("a numeric column declares no levels")
        if self.kind in CODED_KINDS and len(self.levels) < 2:
            raise ValueError(f"a {self.kind} column needs at least 2 levels, got "
                             f"{list(self.levels)}")
        if self.kind == "binary" and len(self.levels) != 2:
            raise ValueError(f"a binary column has exactly 2 levels, got {list(self.levels)}")

    @property
    def width(self) -> int:
        """How many encoded columns it takes."""
        return len(self.levels) if self.kind == "categorical" else 1

    @property
    def voted(self) -> bool:
        """Whether its target is imputed as a distribution over levels (binary, categorical)."""
        return self.kind in ("binary", "categorical")


class MixedEncoding:
    """The encoding of a table's columns (see module); ``codings`` in column order."""

    def __init__(self, codings: Sequence[ColumnCoding]) -> None:
        self.codings = tuple(codings)
        starts = np.cumsum([0] + [coding.width for coding in self.codings])
        self.blocks = [np.arange(starts[j], starts[j + 1]) for j in range(len(self.codings))]
        self.n_encoded = int(starts[-1])

    @property
    def any_coded(self) -> bool:
        """Whether some column is not numeric."""
        return any(coding.kind != "numeric" for coding in self.codings)

    def fixed_scale(self) -> np.ndarray:
        """Per encoded column, its fixed divisor (NaN: scaled from the data, as numerics)."""
        scale = np.full(self.n_encoded, np.nan)
        for coding, block in zip(self.codings, self.blocks, strict=True):
            if coding.kind == "categorical":
                scale[block] = INDICATOR_SCALE
            elif coding.kind == "binary":
                scale[block] = BINARY_SCALE
        return scale

    def indicator_blocks(self) -> list[np.ndarray]:
        """The encoded columns of each categorical column (its one-hot block)."""
        return [block for coding, block in zip(self.codings, self.blocks, strict=True)
                if coding.kind == "categorical"]

    def onehot_blocks(self) -> list[list[int]]:
        """The encoded columns of each binary or categorical column (for the federated
        release these stay in public coordinates; see
        :func:`~fediim.federated.release.coded_gram_sensitivity`)."""
        return [[int(c) for c in block] for coding, block in
                zip(self.codings, self.blocks, strict=True) if coding.voted]

    def code_bounds(self, bounds: np.ndarray) -> np.ndarray:
        """Bounds (m, 2) with every coded column's row replaced by its codes' range."""
        out = np.array(bounds, dtype=np.float64)
        for j, coding in enumerate(self.codings):
            if coding.kind != "numeric":
                out[j] = (0.0, float(len(coding.levels) - 1))
        return out

    def encoded_bounds(self, bounds: np.ndarray) -> np.ndarray:
        """Public bounds (m, 2) of the table's columns as bounds of the encoded columns:
        a numeric column keeps its own, an ordinal one its ranks [0, L - 1], and a binary
        code or an indicator [-1, 1], so that the federation's scaling into [-1/2, 1/2]
        keeps 0 at 0 and puts 1 at 1/2 (one non-zero entry per one-hot block)."""
        bounds = np.asarray(bounds, dtype=np.float64)
        out = np.empty((self.n_encoded, 2))
        for j, (coding, block) in enumerate(zip(self.codings, self.blocks, strict=True)):
            if coding.kind == "numeric":
                out[block] = bounds[j]
            elif coding.kind == "ordinal":
                out[block] = (0.0, float(len(coding.levels) - 1))
            else:
                out[block] = (-1.0, 1.0)
        return out

    def encoded_flags(self, flags: np.ndarray | None) -> np.ndarray:
        """Per-column flags (e.g. which columns a clipping box may narrow; default all)
        over the encoded columns, False for every coded column (its range is its codes)."""
        flags = np.ones(len(self.codings), bool) if flags is None else np.asarray(flags, bool)
        return np.concatenate([np.full(len(block), bool(flag) and coding.kind == "numeric")
                               for flag, coding, block in
                               zip(flags, self.codings, self.blocks, strict=True)])

    def encode(self, codes: np.ndarray) -> np.ndarray:
        """(n, m) numbers and codes (NaN = missing) to the (n, n_encoded) engine matrix."""
        codes = np.asarray(codes, dtype=np.float64)
        out = np.empty((codes.shape[0], self.n_encoded))
        for j, (coding, block) in enumerate(zip(self.codings, self.blocks, strict=True)):
            column = codes[:, j]
            if coding.kind != "categorical":
                out[:, block[0]] = column
                continue
            missing = np.isnan(column)
            onehot = (np.where(missing, -1, column)[:, None] == np.arange(coding.width))
            out[:, block] = np.where(missing[:, None], np.nan, onehot.astype(np.float64))
        return out

    def encoded_kinds(self) -> list[str]:
        """Per encoded column, the kind of the table column it belongs to."""
        return [coding.kind for coding, block in zip(self.codings, self.blocks, strict=True)
                for _ in block]

    def decode(self, encoded: ImputationResult, codes: np.ndarray,
               choose: LevelChoice | None = None) -> ImputationResult:
        """The engine's result on the encoded matrix as a result over the table's columns:
        codes for coded columns, and per imputed voted cell its level's probability.

        ``choose`` picks each voted cell's level from its distribution over the levels
        (q, L); by default the most probable one, a draw for multiple imputation
        (:func:`draw_levels`). The probability reported is the chosen level's."""
        choose = most_probable if choose is None else choose
        n_rows, n_columns = codes.shape
        firsts = [int(block[0]) for block in self.blocks]
        result = ImputationResult(
            values=np.array(codes, dtype=np.float64), imputed=np.isnan(codes),
            uncertainty=encoded.uncertainty[:, firsts].copy(),
            method=encoded.method[:, firsts].copy(), ell=encoded.ell[:, firsts].copy(),
            n_candidates=encoded.n_candidates[:, firsts].copy(),
            probability=np.full((n_rows, n_columns), np.nan))
        for j, block in enumerate(self.blocks):
            cells = result.imputed[:, j]
            if not cells.any():
                continue
            values, chosen = self._decoded_cells(j, encoded.values[np.ix_(cells, block)],
                                                 choose)
            result.values[cells, j] = values
            if chosen is not None:
                result.probability[cells, j] = chosen
                result.uncertainty[cells, j] = 1.0 - chosen
                result.ell[cells, j] = encoded.ell[np.ix_(cells, block)].mean(axis=1)
        return result

    def decoded_values(self, encoded: np.ndarray, codes: np.ndarray, choose: LevelChoice
                       ) -> np.ndarray:
        """Like :meth:`decode`, the values only: ``codes`` with every missing cell filled
        from the engine's matrix ``encoded`` (raw units), each voted level by ``choose``."""
        values = np.array(codes, dtype=np.float64)
        for j, block in enumerate(self.blocks):
            cells = np.isnan(values[:, j])
            if cells.any():
                values[cells, j] = self._decoded_cells(j, encoded[np.ix_(cells, block)],
                                                       choose)[0]
        return values

    def _decoded_cells(self, column: int, scores: np.ndarray, choose: LevelChoice
                       ) -> tuple[np.ndarray, np.ndarray | None]:
        """A column's cells from their encoded ``scores`` (q, width): the values (a numeric
        one as it is, an ordinal rank rounded to a level, a voted level by ``choose``) and,
        for a voted column, the chosen level's probability."""
        coding = self.codings[column]
        if coding.kind == "numeric":
            return scores[:, 0], None
        if coding.kind == "ordinal":
            return np.clip(np.round(scores[:, 0]), 0, len(coding.levels) - 1), None
        probabilities = level_probabilities(scores, coding.kind)
        chosen = choose(probabilities)
        return chosen.astype(np.float64), probabilities[np.arange(len(chosen)), chosen]

    def code_kinds(self) -> dict[int, tuple[str, tuple[float, ...]]]:
        """The coded columns as ``column_kinds`` of :class:`~fediim.IIMImputer` for a
        table of level codes (by position, levels 0, 1, ..., L - 1)."""
        return {j: (coding.kind, tuple(float(code) for code in range(len(coding.levels))))
                for j, coding in enumerate(self.codings) if coding.kind != "numeric"}

    def labels(self, codes: np.ndarray) -> np.ndarray:
        """Codes back to labels: a float array when every level is a number, else objects."""
        numeric = all(not isinstance(level, str) for coding in self.codings
                      for level in coding.levels)
        out = np.array(codes, dtype=np.float64 if numeric else object)
        for j, coding in enumerate(self.codings):
            if coding.kind == "numeric":
                continue
            column = np.asarray(codes[:, j], dtype=np.float64)
            observed = ~np.isnan(column)
            table = np.array(coding.levels, dtype=out.dtype)
            out[observed, j] = table[column[observed].astype(np.intp)]
        return out


def fit_encoding(X: Any, column_kinds: dict[Any, Any] | None) -> MixedEncoding | None:
    """The encoding of ``X``'s columns (``column_kinds`` as in
    :class:`~fediim.IIMImputer`, else pandas categories), or None when every column is
    numeric."""
    categories = _pandas_categories(X)
    if not column_kinds and not categories:
        return None
    names, columns = _named_columns(X)
    encoding = MixedEncoding(codings_from(column_kinds, names, columns, categories))
    return encoding if encoding.any_coded else None


def schema_encoding(schema: TableSchema) -> MixedEncoding | None:
    """The encoding of a table read with ``schema`` (coded cells hold codes 0..L-1), as
    ``FederatedIIM(column_kinds=schema.code_kinds())`` fits it: the Flower apps and the
    in-process estimator release and impute the same encoded columns. None when every
    column is numeric (the table is then used as it is)."""
    if not schema.has_coded_columns:
        return None
    return MixedEncoding([
        ColumnCoding() if spec.levels is None else
        ColumnCoding(spec.kind, tuple(float(code) for code in range(len(spec.levels))))
        for spec in schema.columns])


@dataclass(frozen=True)
class ReleaseColumns:
    """The columns a federated release over a schema's table is made of: its encoded
    columns (:func:`schema_encoding`; the table itself when every column is numeric), their
    public bounds, which of them a data-derived clipping box may narrow (the numeric ones)
    and the one-hot blocks kept in public coordinates in every cell. The Flower apps'
    per-site releases, both sides of their secure sums and
    ``FederatedIIM(column_kinds=schema.code_kinds())`` all release over these."""

    encoding: MixedEncoding | None
    bounds: np.ndarray
    clip_columns: np.ndarray
    onehot_blocks: list[list[int]]

    @property
    def width(self) -> int:
        """How many columns the release has."""
        return len(self.clip_columns)

    def encode(self, values: np.ndarray) -> np.ndarray:
        """A table read with the schema (codes for coded cells) as the released columns."""
        return values if self.encoding is None else self.encoding.encode(values)


def release_columns(schema: TableSchema) -> ReleaseColumns:
    """The :class:`ReleaseColumns` of ``schema``'s tables (its bounds must be complete)."""
    encoding, bounds = schema_encoding(schema), schema.bounds_array()
    if encoding is None:
        return ReleaseColumns(None, bounds, np.ones(len(bounds), bool), [])
    return ReleaseColumns(encoding, encoding.encoded_bounds(bounds),
                          encoding.encoded_flags(None), encoding.onehot_blocks())


def encoded_width(schema: TableSchema) -> int:
    """How many columns a release over ``schema``'s table has (its encoded columns)."""
    encoding = schema_encoding(schema)
    return len(schema.columns) if encoding is None else encoding.n_encoded


def _named_columns(X: Any) -> tuple[list[str], list[list[Any]]]:
    """Column names (a DataFrame's, else x0, x1, ...) and each column's cells."""
    if hasattr(X, "iloc") and hasattr(X, "columns"):
        return ([str(name) for name in X.columns],
                [list(X.iloc[:, j]) for j in range(X.shape[1])])
    array = np.asarray(X, dtype=object)
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D table, got shape {array.shape}")
    return [f"x{j}" for j in range(array.shape[1])], [list(col) for col in array.T]


def _pandas_categories(X: Any) -> dict[str, tuple[list[Any], bool]]:
    """A DataFrame's ``category`` columns: {name: (categories, ordered)}."""
    dtypes = getattr(X, "dtypes", None)
    if dtypes is None or not hasattr(X, "columns"):
        return {}
    return {str(name): (list(dtype.categories), bool(dtype.ordered))
            for name, dtype in zip(X.columns, dtypes, strict=True)
            if getattr(dtype, "name", "") == "category"}


def table_codes(X: Any, encoding: MixedEncoding) -> Any:
    """``X`` (array or DataFrame) as floats, coded columns' labels replaced by codes."""
    names, columns = _named_columns(X)
    if len(columns) != len(encoding.codings):
        raise ValueError(f"X has {len(columns)} columns, but the imputer was fitted with "
                         f"{len(encoding.codings)}")
    codes = np.empty((len(columns[0]) if columns else 0, len(columns)))
    for j, (coding, cells) in enumerate(zip(encoding.codings, columns, strict=True)):
        codes[:, j] = (np.asarray(cells, dtype=np.float64) if coding.kind == "numeric"
                       else level_codes(cells, coding.levels, names[j]))
    if hasattr(X, "iloc") and hasattr(X, "columns"):
        import pandas as pd

        return pd.DataFrame(codes, columns=X.columns, index=X.index)
    return codes


def level_probabilities(scores: np.ndarray, kind: str) -> np.ndarray:
    """Voted level scores (q, L) — or (q, 1) for a binary code, P(second level) — as
    probabilities (q, L): clipped to [0, 1] and normalised (all zero: uniform)."""
    if kind == "binary":
        second = np.clip(scores[:, 0], 0.0, 1.0)
        return np.column_stack([1.0 - second, second])
    clipped = np.clip(scores, 0.0, 1.0)
    total = clipped.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, clipped / total, 1.0 / scores.shape[1])


def most_probable(probabilities: np.ndarray) -> np.ndarray:
    """Per row of ``probabilities`` (q, L), the most probable level's code."""
    return np.argmax(probabilities, axis=1)


def draw_levels(probabilities: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per row of ``probabilities`` (q, L), a level's code drawn with its probability
    (one uniform per row, inverse CDF): always a declared level."""
    cumulative = np.cumsum(probabilities, axis=1)
    uniform = rng.random(len(probabilities)) * cumulative[:, -1]
    return np.minimum((cumulative <= uniform[:, None]).sum(axis=1),
                      probabilities.shape[1] - 1)


def level_codes(column: Sequence[Any], levels: Sequence[Any], name: str) -> np.ndarray:
    """A column of labels (numbers or strings; None/NaN = missing) as level codes.

    A number matches a numeric level of equal value, a string the same string (stripped);
    anything else is a ValueError naming the column, the row and the declared levels.
    """
    by_text = {level: code for code, level in enumerate(levels) if isinstance(level, str)}
    by_number = {float(level): code for code, level in enumerate(levels)
                 if not isinstance(level, str)}
    out = np.full(len(column), np.nan)
    for row, value in enumerate(column):
        if value is None or type(value).__name__ == "NAType" or (
                isinstance(value, float | np.floating) and np.isnan(value)):
            continue
        if isinstance(value, str | np.str_):
            code = by_text.get(str(value).strip())
        elif isinstance(value, bool | np.bool_):
            code = None
        else:
            code = by_number.get(float(value))
        if code is None:
            raise ValueError(f"column {name!r}, row {row + 1}: {value!r} is not a declared "
                             f"level; expected one of {list(levels)} or a missing value")
        out[row] = code
    return out


def codings_from(column_kinds: Mapping[Any, Any] | None, names: Sequence[str],
                 columns: Sequence[Sequence[Any]], categories: Mapping[str, Any]
                 ) -> list[ColumnCoding]:
    """Each column's coding from ``column_kinds`` ({name or position: kind, or (kind,
    levels)}), else pandas categories (``categories``: {name: (levels, ordered)}); a coded
    kind without declared levels takes the observed labels, sorted."""
    kinds = dict(column_kinds or {})
    unknown = [key for key in kinds if key not in names and not (
        isinstance(key, int) and 0 <= key < len(names))]
    if unknown:
        raise ValueError(f"column_kinds names unknown column(s) {unknown}; the columns are "
                         f"{list(names)}")
    codings = []
    for j, name in enumerate(names):
        spec = kinds.get(name, kinds.get(j))
        if spec is None and name in categories:
            levels, ordered = categories[name]
            spec = ("ordinal" if ordered else "categorical", levels)
        kind, levels = (spec, None) if spec is None or isinstance(spec, str) else spec
        kind = kind or "numeric"
        if kind in CODED_KINDS and levels is None:
            levels = _observed_levels(columns[j])
        codings.append(ColumnCoding(kind, tuple(levels) if levels is not None else ()))
    return codings


def _observed_levels(column: Sequence[Any]) -> list[Any]:
    """The distinct labels of a column, sorted (numbers before strings)."""
    seen = {value for value in column if value is not None and not (
        isinstance(value, float | np.floating) and np.isnan(value))
        and type(value).__name__ != "NAType"}
    numbers = sorted(float(value) for value in seen if not isinstance(value, str))
    return numbers + sorted(str(value) for value in seen if isinstance(value, str))
