"""Downstream analyses of imputed tables: a regression fitted on them, and its coefficient.

What imputation does to the analysis that follows it: a linear or logistic regression
(scikit-learn, no penalty) of a target column on the others, fitted on each completed
table, gives a chosen coefficient with its standard error (from the fit's information
matrix) and, for a binary target, the accuracy and AUC of its predictions. Over M
imputations the coefficient is pooled with Rubin's rules (:func:`fediim.mi.pool`); over
replicates, the interval's coverage of the complete-data value is what tells a proper
multiple imputation from a single one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.metrics import roc_auc_score

from fediim.mi import pool

__all__ = ["CoefficientFit", "Interval", "Model", "fit_coefficient", "pooled_interval",
           "single_interval"]

Model = Literal["linear", "logistic"]


@dataclass(frozen=True)
class CoefficientFit:
    """One regression on one completed table.

    estimate, variance : the chosen coefficient and its squared standard error.
    df : the complete-data residual degrees of freedom, ``n - p``.
    accuracy, auc : of the fitted predictions of a binary target (logistic), else None.
    """

    estimate: float
    variance: float
    df: float
    accuracy: float | None = None
    auc: float | None = None


@dataclass(frozen=True)
class Interval:
    """A 95% interval for a coefficient: its estimate and bounds."""

    estimate: float
    low: float
    high: float

    def covers(self, truth: float) -> bool:
        return bool(self.low <= truth <= self.high)


def fit_coefficient(table: np.ndarray, target: int, coefficient: int,
                    model: Model = "linear", threshold: float | None = None
                    ) -> CoefficientFit:
    """Regress column ``target`` of a complete ``table`` on every other column and return
    the coefficient of column ``coefficient``. ``logistic`` needs a binary target: column
    ``target > threshold`` (``threshold`` None: the target must already be 0/1)."""
    features = [column for column in range(table.shape[1]) if column != target]
    if coefficient not in features:
        raise ValueError(f"the coefficient's column {coefficient} is the target or absent")
    x, y = table[:, features], table[:, target]
    position = features.index(coefficient) + 1  # after the intercept
    design = np.column_stack([np.ones(len(x)), x])
    df = float(len(x) - design.shape[1])
    if model == "linear":
        fitted = LinearRegression().fit(x, y)
        residuals = y - fitted.predict(x)
        sigma2 = float(residuals @ residuals) / max(df, 1.0)
        covariance = sigma2 * np.linalg.pinv(design.T @ design)
        return CoefficientFit(float(fitted.coef_[position - 1]),
                              float(covariance[position, position]), df)
    labels = (y > threshold).astype(int) if threshold is not None else y.astype(int)
    fitted = LogisticRegression(penalty=None, max_iter=2000).fit(x, labels)
    probability = fitted.predict_proba(x)[:, 1]
    information = design.T @ (design * (probability * (1 - probability))[:, None])
    covariance = np.linalg.pinv(information)
    auc = float(roc_auc_score(labels, probability)) if 0 < labels.mean() < 1 else None
    return CoefficientFit(float(fitted.coef_[0, position - 1]),
                          float(covariance[position, position]), df,
                          accuracy=float(np.mean((probability > 0.5) == labels)), auc=auc)


def single_interval(fit: CoefficientFit, level: float = 0.95) -> Interval:
    """The interval of one completed table analysed as if it were complete data."""
    half = float(stats.t.ppf(0.5 + level / 2, fit.df)) * np.sqrt(fit.variance)
    return Interval(fit.estimate, fit.estimate - half, fit.estimate + half)


def pooled_interval(fits: Sequence[CoefficientFit], level: float = 0.95) -> Interval:
    """Rubin's rules over the fits of M completed tables (Barnard-Rubin df)."""
    pooled = pool([fit.estimate for fit in fits], [fit.variance for fit in fits],
                  df_complete=fits[0].df)
    low, high = pooled.interval(level)
    return Interval(pooled.estimate, low, high)
