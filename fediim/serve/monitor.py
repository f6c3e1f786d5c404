"""Quality and drift monitoring of a running service, on aggregates only.

:class:`QualityMonitor` masks one random cell of a share of the incoming *complete* rows,
imputes it like any other cell and keeps the squared errors of the last ``window`` such
cells per column. :class:`DriftMonitor` keeps the last ``window`` observed values per
column and compares their mean with the reference mean, in standard deviations: the
site's own rows where it measures the column, the bank's moments where it does not (see
:meth:`~fediim.serve.site.Site.drift_reference`). Either past its threshold is drift:
the rows no longer look like those the service was prepared on, and the site should join
a new run. Nothing here logs a value.
"""

from __future__ import annotations

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
    ``window``: how many masked cells per column the error is over.
    """

    def __init__(self, n_columns: int, fraction: float, window: int,
                 rng: np.random.Generator | None = None) -> None:
        self.fraction = fraction
        self._squared = RollingWindow(n_columns, window)
        self._rng = rng or np.random.default_rng()
        self.n_columns = n_columns

    def choose(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, columns) of the cells of ``x`` to mask: one per chosen complete row."""
        if self.n_columns < 2 or self.fraction <= 0:
            return np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.intp)
        complete = np.flatnonzero(~np.isnan(x).any(axis=1))
        rows = complete[self._rng.random(len(complete)) < self.fraction]
        return rows, self._rng.integers(0, self.n_columns, len(rows))

    def record(self, columns: np.ndarray, errors: np.ndarray) -> None:
        """Add the errors (imputed minus true, raw units) of masked cells in ``columns``."""
        for column in np.unique(columns):
            self._squared.add(int(column), errors[columns == column] ** 2)

    def counts(self) -> np.ndarray:
        """Masked cells in each column's window."""
        return self._squared.counts()

    def rmse(self) -> np.ndarray:
        """Rolling RMSE per column, raw units (NaN before any cell)."""
        return np.sqrt(self._squared.means())


@dataclass(frozen=True)
class DriftState:
    """Where the service stands against the bank, per column and overall.

    mean_shift : |window mean - reference mean| / scale (NaN before ``min_rows`` values).
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

    ``reference_mean``: per-column means; ``scale``: the standard deviation the shift is
    measured in (raw units);
    ``baseline_rmse``: the site's cross-validated RMSE per column (raw units, NaN where
    unknown); the thresholds as in :class:`~fediim.protocol.site_config.ServeSettings`.
    """

    def __init__(self, reference_mean: np.ndarray, scale: np.ndarray,
                 baseline_rmse: np.ndarray,
                 *, window: int, min_rows: int, mean_shift: float, min_cells: int,
                 error_ratio: float) -> None:
        self.reference_mean, self.scale = reference_mean, np.maximum(scale, 1e-12)
        self.baseline_rmse = baseline_rmse
        self._values = RollingWindow(len(reference_mean), window)
        self.min_rows, self.mean_shift = min_rows, mean_shift
        self.min_cells, self.error_ratio = min_cells, error_ratio

    def observe(self, x: np.ndarray) -> None:
        """Add the observed values of the incoming rows ``x`` (raw units, NaN missing)."""
        for column in range(x.shape[1]):
            values = x[:, column]
            self._values.add(column, values[~np.isnan(values)])

    def state(self, monitor: QualityMonitor) -> DriftState:
        """The drift state now, with the quality monitor's rolling errors."""
        with np.errstate(invalid="ignore", divide="ignore"):
            shift = np.abs(self._values.means() - self.reference_mean) / self.scale
            ratio = monitor.rmse() / self.baseline_rmse
        shift = np.where(self._values.counts() >= self.min_rows, shift, np.nan)
        ratio = np.where(monitor.counts() >= self.min_cells, ratio, np.nan)
        drifted: dict[int, str] = {}
        for column in range(len(shift)):
            if shift[column] > self.mean_shift:
                drifted[column] = (f"mean moved {shift[column]:.2f} sd from the reference "
                                   f"(threshold {self.mean_shift:g})")
            elif ratio[column] > self.error_ratio:
                drifted[column] = (f"monitored error {ratio[column]:.2f}x the validated one "
                                   f"(threshold {self.error_ratio:g}x)")
        return DriftState(mean_shift=shift, error_ratio=ratio, drifted=drifted)
