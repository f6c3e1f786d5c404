"""Quality and drift monitoring of a running service, on aggregates only.

:class:`QualityMonitor` masks one random cell of a share of the incoming *complete* rows,
imputes it like any other cell and keeps the errors of the last ``window`` such cells per
column: squared errors (an RMSE) for a numeric or ordinal column, misses (a level error
rate) for a binary or categorical one, whose codes have no distance. :class:`DriftMonitor`
keeps the last ``window`` observed values per watched column and compares their mean with
the reference mean, in standard deviations: the site's own rows where it measures the
column, the bank's moments where it does not (see
:meth:`~fediim.serve.site.Site.drift_reference`). A categorical column is watched by its
levels' indicators (each mean a level's frequency) and shifts by its most moved level.
Either past its threshold is drift: the rows no longer look like those the service was
prepared on, and the site should join a new run. Nothing here logs a value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["DriftMonitor", "DriftState", "QualityMonitor", "RollingWindow"]


class RollingWindow:
    """The last ``size`` numbers added, per column (a ring buffer), for their means."""

    def __init__(self, n_columns: int, size: int) -> None:
        self._values = np.zeros((n_columns, size))
        self._next = np.zeros(n_columns, dtype=np.int64)
        self._count = np.zeros(n_columns, dtype=np.int64)
        self.size = size

    def add(self, column: int, values: np.ndarray) -> None:
        """Add ``values`` (1-D) to ``column``'s window, dropping the oldest."""
        values = np.asarray(values, dtype=np.float64)[-self.size:]
        slots = (self._next[column] + np.arange(len(values))) % self.size
        self._values[column, slots] = values
        self._next[column] = (self._next[column] + len(values)) % self.size
        self._count[column] = min(self._count[column] + len(values), self.size)

    def counts(self) -> np.ndarray:
        """How many numbers each column's window holds."""
        return self._count.copy()

    def means(self) -> np.ndarray:
        """Each column's mean over its window (NaN where empty)."""
        sums = np.array([self._values[c, :n].sum() for c, n in enumerate(self._count)])
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self._count > 0, sums / np.maximum(self._count, 1), np.nan)


class QualityMonitor:
    """Which cells of incoming complete rows to mask, and the rolling error per column.

    ``fraction``: the share of complete rows that get one cell masked (chosen at random);
    ``window``: how many masked cells per column the error is over; ``voted``: per column,
    whether it is binary or categorical (scored by misses, not squared errors).
    """

    def __init__(self, n_columns: int, fraction: float, window: int,
                 rng: np.random.Generator | None = None,
                 voted: np.ndarray | None = None) -> None:
        self.fraction = fraction
        self._errors = RollingWindow(n_columns, window)
        self._rng = rng or np.random.default_rng()
        self.n_columns = n_columns
        self.voted = np.zeros(n_columns, bool) if voted is None else np.asarray(voted, bool)

    def choose(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, columns) of the cells of ``x`` to mask: one per chosen complete row."""
        if self.n_columns < 2 or self.fraction <= 0:
            return np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.intp)
        complete = np.flatnonzero(~np.isnan(x).any(axis=1))
        rows = complete[self._rng.random(len(complete)) < self.fraction]
        return rows, self._rng.integers(0, self.n_columns, len(rows))

    def record(self, columns: np.ndarray, errors: np.ndarray) -> None:
        """Add the errors (imputed minus true, raw units; codes for a coded column) of
        masked cells in ``columns``: squared, or for a voted column whether it missed."""
        for column in np.unique(columns):
            found = errors[columns == column]
            self._errors.add(int(column), (found != 0).astype(np.float64)
                             if self.voted[column] else found**2)

    def counts(self) -> np.ndarray:
        """Masked cells in each column's window."""
        return self._errors.counts()

    def rmse(self) -> np.ndarray:
        """Rolling RMSE per column, raw units (NaN before any cell and for a voted
        column)."""
        return np.where(self.voted, np.nan, np.sqrt(self._errors.means()))

    def level_error_rate(self) -> np.ndarray:
        """Rolling share of a voted column's masked cells imputed with another level than
        the true one (NaN before any cell and for a numeric or ordinal column)."""
        return np.where(self.voted, self._errors.means(), np.nan)


@dataclass(frozen=True)
class DriftState:
    """Where the service stands against the bank, per column and overall.

    mean_shift : |window mean - reference mean| / scale (NaN before ``min_rows`` values);
        for a categorical column, that of its most moved level's frequency.
    error_ratio : monitored RMSE / validated RMSE (NaN where either is not known yet).
    drifted : the columns past either threshold, with the reason.
    """

    mean_shift: np.ndarray
    error_ratio: np.ndarray
    drifted: dict[int, str]

    @property
    def drift(self) -> bool:
        """Whether any column drifted."""
        return bool(self.drifted)


class DriftMonitor:
    """The standardised mean shift of incoming rows against the reference means, and the
    monitored error against the validated one.

    ``reference_mean``: per watched column, its mean; ``scale``: the standard deviation
    the shift is measured in (raw units); ``blocks``: per table column, its watched
    columns (default: one each; a categorical column's are its level indicators, named
    by ``level_names``, per table column its levels' labels or None);
    ``baseline_rmse``: the site's cross-validated RMSE per table column (raw units, NaN
    where unknown); the thresholds as in :class:`~fediim.protocol.site_config.ServeSettings`.
    """

    def __init__(self, reference_mean: np.ndarray, scale: np.ndarray,
                 baseline_rmse: np.ndarray,
                 *, window: int, min_rows: int, mean_shift: float, min_cells: int,
                 error_ratio: float, blocks: Sequence[Sequence[int]] | None = None,
                 level_names: Sequence[Sequence[str] | None] | None = None) -> None:
        self.reference_mean, self.scale = reference_mean, np.maximum(scale, 1e-12)
        self.baseline_rmse = baseline_rmse
        self.blocks = [np.asarray(block, dtype=np.intp) for block in (
            [[c] for c in range(len(reference_mean))] if blocks is None else blocks)]
        self.level_names = level_names or [None] * len(self.blocks)
        self._values = RollingWindow(len(reference_mean), window)
        self.min_rows, self.mean_shift = min_rows, mean_shift
        self.min_cells, self.error_ratio = min_cells, error_ratio

    @property
    def column_scale(self) -> np.ndarray:
        """Per table column, the standard deviation its values are read in (raw units;
        NaN for a column watched by its levels)."""
        return np.array([self.scale[block[0]] if len(block) == 1 else np.nan
                         for block in self.blocks])

    def observe(self, x: np.ndarray) -> None:
        """Add the observed values of the incoming rows ``x`` (the watched columns, raw
        units, NaN missing)."""
        for column in range(x.shape[1]):
            values = x[:, column]
            self._values.add(column, values[~np.isnan(values)])

    def state(self, monitor: QualityMonitor) -> DriftState:
        """The drift state now, with the quality monitor's rolling errors."""
        with np.errstate(invalid="ignore", divide="ignore"):
            watched = np.abs(self._values.means() - self.reference_mean) / self.scale
            ratio = monitor.rmse() / self.baseline_rmse
        watched = np.where(self._values.counts() >= self.min_rows, watched, np.nan)
        ratio = np.where(monitor.counts() >= self.min_cells, ratio, np.nan)
        moved = [_most_moved(watched[block]) for block in self.blocks]
        shift = np.array([value for _, value in moved])
        drifted: dict[int, str] = {}
        for column, (level, value) in enumerate(moved):
            if value > self.mean_shift:
                names = self.level_names[column]
                what = "mean" if names is None else f"frequency of level {names[level]!r}"
                drifted[column] = (f"{what} moved {value:.2f} sd from the reference "
                                   f"(threshold {self.mean_shift:g})")
            elif ratio[column] > self.error_ratio:
                drifted[column] = (f"monitored error {ratio[column]:.2f}x the validated one "
                                   f"(threshold {self.error_ratio:g}x)")
        return DriftState(mean_shift=shift, error_ratio=ratio, drifted=drifted)


def _most_moved(shifts: np.ndarray) -> tuple[int, float]:
    """The position and value of the largest of ``shifts`` (NaN when none is known)."""
    if not np.any(np.isfinite(shifts)):
        return 0, float("nan")
    position = int(np.nanargmax(shifts))
    return position, float(shifts[position])
