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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy import stats
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.metrics import roc_auc_score

from fediim.mi import pool
from simulations.config import DownstreamConfig, Study
from simulations.tables import eps_label, fmt, markdown_table

__all__ = ["CoefficientFit", "Interval", "Model", "downstream_markdown", "downstream_record",
           "fit_coefficient", "pooled_interval", "single_interval", "summarise_downstream"]

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
                    model: Model = "linear", threshold: float | None = None,
                    score_on: np.ndarray | None = None) -> CoefficientFit:
    """Regress column ``target`` of a complete ``table`` on every other column and return
    the coefficient of column ``coefficient``. ``logistic`` needs a binary target: column
    ``target > threshold`` (``threshold`` None: the target must already be 0/1); its
    accuracy and AUC are those of its predictions on ``score_on`` (default: ``table``),
    e.g. the true values of the rows an imputed table completes."""
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
    fitted = LogisticRegression(C=np.inf, max_iter=5000).fit(x, _labels(y, threshold))
    probability = fitted.predict_proba(x)[:, 1]
    information = design.T @ (design * (probability * (1 - probability))[:, None])
    covariance = np.linalg.pinv(information)
    scored = table if score_on is None else score_on
    truth = _labels(scored[:, target], threshold)
    predicted = fitted.predict_proba(scored[:, features])[:, 1]
    auc = float(roc_auc_score(truth, predicted)) if 0 < truth.mean() < 1 else None
    return CoefficientFit(float(fitted.coef_[0, position - 1]),
                          float(covariance[position, position]), df,
                          accuracy=float(np.mean((predicted > 0.5) == truth)), auc=auc)


def _labels(target: np.ndarray, threshold: float | None) -> np.ndarray:
    """0/1 labels: ``target > threshold``, or the target itself rounded."""
    return ((target > threshold) if threshold is not None else np.round(target)).astype(int)


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


# -- in a study ---------------------------------------------------------------------------
def _analysis(cfg: DownstreamConfig, columns: Sequence[str]) -> tuple[list[int], int, int]:
    """Column indices of the regression's table ``[*features, target]``, the target's and
    the coefficient's positions in it."""
    features = cfg.features or [c for c in columns if c != cfg.target]
    chosen = [list(columns).index(c) for c in (*features, cfg.target)]
    return chosen, len(features), features.index(cfg.coefficient)


def _fit_record(fit: CoefficientFit, interval: Interval, reference: float) -> dict[str, Any]:
    return {"estimate": interval.estimate, "low": interval.low, "high": interval.high,
            "covers": interval.covers(reference), "accuracy": fit.accuracy, "auc": fit.auc}


def downstream_record(cfg: DownstreamConfig, columns: Sequence[str],
                      truth: Sequence[np.ndarray], single: Sequence[np.ndarray],
                      drawn: Sequence[Sequence[np.ndarray]] | None) -> dict[str, Any]:
    """The downstream analysis of one imputed federation against the complete data.

    The analysis rows are each site's rows observed, in the data, on the target and every
    regressor (real gaps have no truth), pooled over the sites. The reference is the fit
    on their true values; ``single`` (one table per site) is analysed as if it were data;
    ``drawn`` (``[imputation][site]``, None when the method draws none) is pooled with
    Rubin's rules, its accuracy and AUC averaged over the imputations.
    """
    chosen, target, coefficient = _analysis(cfg, columns)
    rows = [~np.isnan(x[:, chosen]).any(axis=1) for x in truth]

    def table(sites: Sequence[np.ndarray]) -> np.ndarray:
        return np.vstack([x[keep][:, chosen] for x, keep in zip(sites, rows, strict=True)])

    true_table = table(truth)

    def fit(sites: Sequence[np.ndarray]) -> CoefficientFit:
        return fit_coefficient(table(sites), target, coefficient, cfg.model, cfg.threshold,
                               score_on=true_table)

    reference = fit(truth)
    found = fit(single)
    record: dict[str, Any] = {
        "reference": reference.estimate, "n_rows": int(len(true_table)),
        "reference_accuracy": reference.accuracy, "reference_auc": reference.auc,
        "single": _fit_record(found, single_interval(found), reference.estimate),
        "multiple": None}
    if drawn is not None:
        fits = [fit(federation) for federation in drawn]
        pooled = _fit_record(fits[0], pooled_interval(fits), reference.estimate)
        for name in ("accuracy", "auc"):
            values = [getattr(f, name) for f in fits if getattr(f, name) is not None]
            pooled[name] = float(np.mean(values)) if values else None
        record["multiple"] = pooled
    return record


def summarise_downstream(records: Sequence[dict[str, Any]]
                         ) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """Per dataset, method and ε (``""`` without one): per arm (single, multiple) the mean
    bias against the complete-data fit, the coverage of the 95% interval over seeds, and
    the mean accuracy and AUC."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for record in records:
        if record.get("downstream") is not None:
            key = (record["dataset"], record["method"], record["epsilon"] or "")
            groups.setdefault(key, []).append(record["downstream"])
    out: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for (dataset, method, eps), found in groups.items():
        cell: dict[str, Any] = {"n_seeds": len(found)}
        for arm in ("single", "multiple"):
            arms = [(f[arm], f["reference"]) for f in found if f[arm] is not None]
            cell[arm] = None if not arms else {
                "bias": float(np.mean([a["estimate"] - ref for a, ref in arms])),
                "coverage": float(np.mean([a["covers"] for a, _ in arms])),
                **{name: _mean_of(a[name] for a, _ in arms) for name in ("accuracy", "auc")}}
        out.setdefault(dataset, {}).setdefault(method, {})[eps] = cell
    return out


def _mean_of(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def downstream_markdown(summary: dict[str, Any], study: Study) -> list[str]:
    """The report's section: per dataset, a row per (method, ε), single against multiple
    imputation (nothing when the study has no ``[downstream]``)."""
    cfg = study.config.downstream
    if cfg is None or not summary:
        return []
    model = ("logistic regression of " + f"`{cfg.target} > {cfg.threshold:g}`"
             if cfg.model == "logistic" and cfg.threshold is not None
             else f"{cfg.model} regression of `{cfg.target}`")
    lines = ["## Downstream analysis", "",
             f"A {model} on {_regressors(cfg)}, "
             f"fitted on each imputed federation (the rows observed on all of them, sites "
             f"pooled). **Bias**: the coefficient of `{cfg.coefficient}` minus its fit on "
             "the complete data, mean over seeds; **coverage**: the share of seeds whose "
             "95% interval holds the complete-data value; accuracy and AUC of the fitted "
             "model's predictions of the true values. *single*: the imputed table analysed "
             f"as if it were data; *multiple*: M = {cfg.n_imputations} drawn tables pooled "
             "with Rubin's rules (Barnard-Rubin df) — only fediim's IIM methods draw them.",
             ""]
    head = ["method", "ε", "seeds", "single bias", "single coverage", "single acc.",
            "single AUC", "multiple bias", "multiple coverage", "multiple acc.",
            "multiple AUC"]
    for dataset, methods in summary.items():
        rows = []
        for method, cells in methods.items():
            for eps, cell in cells.items():
                rows.append([method, eps_label(eps) if eps else "", str(cell["n_seeds"]),
                             *_arm_cells(cell["single"]), *_arm_cells(cell["multiple"])])
        lines += [f"**{dataset}**:", "", markdown_table(head, rows), ""]
    return lines


def _regressors(cfg: DownstreamConfig) -> str:
    return ", ".join(f"`{c}`" for c in cfg.features) if cfg.features else "every other column"


def _arm_cells(arm: dict[str, Any] | None) -> list[str]:
    if arm is None:
        return ["", "", "", ""]
    return [f"{arm['bias']:+.3f}", f"{arm['coverage']:.0%}", fmt(arm["accuracy"]),
            fmt(arm["auc"])]
