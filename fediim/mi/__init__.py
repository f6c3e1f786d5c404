"""Multiple-imputation inference: pool an estimate over M completed tables (Rubin's rules).

An analysis run on each of M imputed tables gives M estimates of one scalar estimand and
their M squared standard errors. :func:`pool` combines them (Rubin 1987; Barnard and Rubin
1999 for the degrees of freedom), so the interval reflects both the sampling variance and
the uncertainty of the imputed values. Pure numpy/scipy: usable on any imputer's output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["PooledEstimate", "pool"]


@dataclass(frozen=True)
class PooledEstimate:
    """One estimand pooled over M imputations with Rubin's rules.

    estimate : the mean of the M estimates (Q-bar).
    within : the mean of the M sampling variances (U-bar).
    between : the variance of the M estimates (B, ddof = 1).
    total : ``within + (1 + 1/M) between`` (T).
    df : degrees of freedom of the t reference distribution (Barnard-Rubin when the
        complete-data degrees of freedom are given, else Rubin's large-sample ones).
    lambda_ : the fraction of the total variance due to missingness,
        ``(1 + 1/M) between / total``.
    riv : the relative increase in variance due to missingness, ``(1 + 1/M) B / U``.
    fmi : the fraction of missing information, ``(riv + 2 / (df + 3)) / (riv + 1)``.
    n_imputations : M.
    """

    estimate: float
    within: float
    between: float
    total: float
    df: float
    lambda_: float
    riv: float
    fmi: float
    n_imputations: int

    @property
    def std_error(self) -> float:
        """The pooled standard error, ``sqrt(total)``."""
        return float(np.sqrt(self.total))

    def interval(self, level: float = 0.95) -> tuple[float, float]:
        """The pooled ``level`` confidence interval, ``estimate -+ t_df * std_error``."""
        if not 0 < level < 1:
            raise ValueError(f"level must lie in (0, 1), got {level!r}")
        half = float(stats.t.ppf(0.5 + level / 2, self.df)) * self.std_error
        return self.estimate - half, self.estimate + half


def pool(estimates: np.ndarray | list[float], variances: np.ndarray | list[float],
         df_complete: float | None = None) -> PooledEstimate:
    """Pool one scalar estimand over M imputations with Rubin's rules.

    Parameters
    ----------
    estimates : array-like of shape (M,)
        The estimate from each completed table.
    variances : array-like of shape (M,)
        Its squared standard error on each completed table.
    df_complete : float, optional
        Degrees of freedom the analysis would have on complete data (``n - p`` for a
        regression with p coefficients). Given, the Barnard-Rubin small-sample degrees of
        freedom are used; ``None`` means infinite (Rubin's original ones).

    Returns
    -------
    PooledEstimate

    Examples
    --------
    >>> from fediim.mi import pool
    >>> pooled = pool([1.0, 1.2, 0.8, 1.1, 0.9], [0.04] * 5, df_complete=100)
    >>> round(pooled.between, 3), round(pooled.total, 3), round(pooled.df, 1)
    (0.025, 0.07, 15.7)
    >>> [round(bound, 3) for bound in pooled.interval()]
    [0.438, 1.562]
    """
    q = np.asarray(estimates, dtype=np.float64).ravel()
    u = np.asarray(variances, dtype=np.float64).ravel()
    n_imputations = q.size
    if n_imputations < 2 or u.size != n_imputations:
        raise ValueError(f"pooling needs M >= 2 estimates and as many variances, got "
                         f"{q.size} estimates and {u.size} variances")
    if not (np.all(np.isfinite(q)) and np.all(np.isfinite(u)) and np.all(u >= 0)):
        raise ValueError("estimates must be finite and variances finite and >= 0")
    if df_complete is not None and not df_complete > 0:
        raise ValueError(f"df_complete must be > 0 or None, got {df_complete!r}")
    within, between = float(u.mean()), float(q.var(ddof=1))
    inflation = (1.0 + 1.0 / n_imputations) * between
    total = within + inflation
    lambda_ = inflation / total if total > 0 else 0.0
    riv = inflation / within if within > 0 else np.inf
    df = _degrees_of_freedom(lambda_, n_imputations, df_complete)
    fmi = (riv + 2.0 / (df + 3.0)) / (riv + 1.0) if np.isfinite(riv) else 1.0
    return PooledEstimate(estimate=float(q.mean()), within=within, between=between,
                          total=total, df=df, lambda_=lambda_, riv=float(riv), fmi=float(fmi),
                          n_imputations=n_imputations)


def _degrees_of_freedom(lambda_: float, n_imputations: int, df_complete: float | None
                        ) -> float:
    """Rubin's ``(M - 1) / lambda^2``, and with complete-data degrees of freedom the
    Barnard-Rubin adjustment ``1 / (1 / df_old + 1 / df_observed)``, never above them."""
    df_old = (n_imputations - 1) / lambda_**2 if lambda_ > 0 else np.inf
    if df_complete is None:
        return float(df_old)
    df_observed = (df_complete + 1.0) / (df_complete + 3.0) * df_complete * (1.0 - lambda_)
    if not np.isfinite(df_old):
        return float(df_observed)
    if df_observed <= 0:
        return float(df_old)
    return float(1.0 / (1.0 / df_old + 1.0 / df_observed))
