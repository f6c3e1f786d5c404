"""Coded columns on UCI Heart: accuracy on hidden categorical cells, numeric NRMSE.

The four hospitals of ``simulations/studies/heart_mixed.toml`` (ca, thal, slope dropped;
chol = 0 and trestbps = 0 are missing), with sex, fbs, exang binary, cp and restecg
categorical and num ordinal (declared levels). Per seed, 10% of each site's observed cells
are hidden at random (MCAR), over every column. Scored on the hidden cells:

* accuracy on the binary and categorical cells (share given their true level), and on
  the ordinal ``num`` apart;
* NRMSE on the numeric cells (each error divided by the column's std over all rows).

Methods, centralized (every site's rows pooled, not private):
    iim_kinds      IIMImputer(column_kinds=...): one-hot encoding, voted level scores
    iim_numeric    today's all-numeric IIMImputer; coded cells rounded to the nearest level
    knn_rounded    scikit-learn KNNImputer (z-scored, k = 10) rounded to the nearest level
    mode           the column's most frequent level (numeric cells: the column mean)
Federated at ε = 4 (each site its own budget, sites release one by one):
    fed_kinds      FederatedIIM(column_kinds=...), hybrid mode
    fed_numeric    FederatedIIM with every column numeric, rounded to the nearest level
    site_mode      each site's own column mode (numeric: its mean)

``--scales`` instead compares the indicator scale (a level mismatch adding 1, 2 or 4 to the
squared distance) on the centralized ``iim_kinds`` only.

``--downstream`` instead fits the classic logistic model of ``num > 0`` on age, sex, cp,
trestbps, thalach, exang, oldpeak (as ``simulations/studies/heart_downstream.toml``) over
the rows observed on all of them, and reports the coefficients of the coded predictors
sex, cp, exang: the complete-data fit, ``iim_kinds``' single imputation analysed as data,
and M = 5 draws of ``IIMImputer(column_kinds=..., n_imputations=5)`` (coded cells drawn
as levels) pooled with Rubin's rules, with their between-imputation variance.

Usage::

    .venv/bin/python benchmarks/categorical.py              # seeds 0-2 -> results/categorical.json
    .venv/bin/python benchmarks/categorical.py --seeds 1 --out /tmp/categorical.json
    .venv/bin/python benchmarks/categorical.py --scales --out results/categorical_scale.json
    .venv/bin/python benchmarks/categorical.py --downstream --out results/categorical_mi.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.impute import KNNImputer

import fediim.impute.encoding as encoding
from fediim import FederatedIIM, IIMImputer
from fediim.io.json_results import write_results
from fediim.io.table import read_csv
from fediim.mi import pool
from simulations.downstream import fit_coefficient, single_interval

HEART = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "heart"
SITES = ["cleveland", "hungarian", "switzerland", "va"]
COLUMNS = ["age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang",
           "oldpeak", "num"]
KINDS: dict[int, tuple[str, tuple[float, ...]]] = {
    1: ("binary", (0.0, 1.0)), 2: ("categorical", (1.0, 2.0, 3.0, 4.0)),
    5: ("binary", (0.0, 1.0)), 6: ("categorical", (0.0, 1.0, 2.0)),
    8: ("binary", (0.0, 1.0)), 10: ("ordinal", (0.0, 1.0, 2.0, 3.0, 4.0)),
}
BOUNDS = np.array([[0, 120], [0, 1], [1, 4], [50, 250], [50, 700], [0, 1], [0, 2], [50, 250],
                   [0, 1], [-3, 7], [0, 4]], dtype=np.float64)
VOTED = [j for j, (kind, _) in KINDS.items() if kind != "ordinal"]
ORDINAL = [j for j, (kind, _) in KINDS.items() if kind == "ordinal"]
NUMERIC = [j for j in range(len(COLUMNS)) if j not in KINDS]
HIDDEN_FRACTION = 0.10
EPSILON = 4.0


def load_sites() -> list[np.ndarray]:
    """The four hospitals over :data:`COLUMNS` (0 in chol and trestbps = missing)."""
    sites = []
    for name in SITES:
        table = read_csv(HEART / f"{name}.csv", allow_empty_columns=True)
        x = table.values[:, [table.columns.index(c) for c in COLUMNS]]
        for column in ("chol", "trestbps"):
            j = COLUMNS.index(column)
            x[x[:, j] == 0, j] = np.nan
        sites.append(x)
    return sites


def hide(sites: list[np.ndarray], seed: int) -> list[np.ndarray]:
    """Per site, a mask of :data:`HIDDEN_FRACTION` of its observed cells (MCAR)."""
    rng = np.random.default_rng(seed)
    return [~np.isnan(x) & (rng.random(x.shape) < HIDDEN_FRACTION) for x in sites]


def as_levels(values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Imputed coded cells moved to the nearest declared level."""
    out = values.copy()
    for j, (_, levels) in KINDS.items():
        cells = np.isnan(x[:, j])
        table = np.asarray(levels)
        out[cells, j] = table[np.abs(out[cells, j, None] - table).argmin(axis=1)]
    return out


def mode_fill(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Coded gaps as ``reference``'s most frequent level, numeric gaps as its mean."""
    out = x.copy()
    for j in range(x.shape[1]):
        cells = np.isnan(x[:, j])
        observed = reference[~np.isnan(reference[:, j]), j]
        if j in KINDS:
            values, counts = np.unique(observed, return_counts=True)
            out[cells, j] = values[np.argmax(counts)] if values.size else np.nan
        else:
            out[cells, j] = observed.mean() if observed.size else np.nan
    return out


def knn_rounded(x: np.ndarray) -> np.ndarray:
    """scikit-learn KNNImputer on the z-scored table, rounded to the nearest level."""
    mean, sd = np.nanmean(x, axis=0), np.nanstd(x, axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    filled = KNNImputer(n_neighbors=10).fit_transform((x - mean) / sd) * sd + mean
    return as_levels(np.where(np.isnan(x), filled, x), x)


def scores(imputed: list[np.ndarray], truth: list[np.ndarray], hidden: list[np.ndarray],
           sd: np.ndarray) -> dict[str, Any]:
    """Accuracy (binary/categorical and ordinal) and numeric NRMSE, pooled and per site."""
    out: dict[str, Any] = {"site": {}}
    pooled: dict[str, list[np.ndarray]] = {"voted": [], "ordinal": [], "numeric": []}
    for name, y, x, mask in zip(SITES, imputed, truth, hidden, strict=True):
        parts = {"voted": _hits(y, x, mask, VOTED), "ordinal": _hits(y, x, mask, ORDINAL),
                 "numeric": _errors(y, x, mask, sd)}
        for key, values in parts.items():
            pooled[key].append(values)
        out["site"][name] = _summary(parts)
    out.update(_summary({key: np.concatenate(values) for key, values in pooled.items()}))
    return out


def _hits(y: np.ndarray, x: np.ndarray, mask: np.ndarray, columns: list[int]) -> np.ndarray:
    rows, cols = np.nonzero(mask[:, columns])
    cols = np.asarray(columns)[cols]
    return (y[rows, cols] == x[rows, cols]).astype(np.float64)


def _errors(y: np.ndarray, x: np.ndarray, mask: np.ndarray, sd: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask[:, NUMERIC])
    cols = np.asarray(NUMERIC)[cols]
    return (y[rows, cols] - x[rows, cols]) / sd[cols]


def _summary(parts: dict[str, np.ndarray]) -> dict[str, Any]:
    def mean(a: np.ndarray) -> float | None:
        return float(a.mean()) if a.size else None

    errors = parts["numeric"]
    return {"accuracy": mean(parts["voted"]), "n_categorical": int(parts["voted"].size),
            "ordinal_accuracy": mean(parts["ordinal"]), "n_ordinal": int(parts["ordinal"].size),
            "nrmse": float(np.sqrt(np.mean(errors**2))) if errors.size else None,
            "n_numeric": int(errors.size)}


def centralized(masked: list[np.ndarray]) -> dict[str, list[np.ndarray]]:
    """The centralized methods on every site's rows pooled, split back per site."""
    pooled = np.vstack(masked)
    cuts = np.cumsum([len(x) for x in masked])[:-1]
    runs = {
        "iim_kinds": IIMImputer(column_kinds=KINDS).fit_transform(pooled),
        "iim_numeric": as_levels(IIMImputer().fit_transform(pooled), pooled),
        "knn_rounded": knn_rounded(pooled),
        "mode": mode_fill(pooled, pooled),
    }
    return {name: np.split(np.asarray(values, dtype=np.float64), cuts)
            for name, values in runs.items()}


def federated(masked: list[np.ndarray], seed: int) -> dict[str, list[np.ndarray]]:
    """FederatedIIM at :data:`EPSILON` with and without the kinds, and each site's mode."""
    clip = [j not in KINDS for j in range(len(COLUMNS))]
    common = {"epsilon": EPSILON, "bounds": BOUNDS, "seed": seed, "clip_columns": clip,
              "aggregation": "per-site"}
    kinds = FederatedIIM(column_kinds=KINDS, **common).fit(masked, site_ids=SITES)
    numeric = FederatedIIM(**common).fit(masked, site_ids=SITES)
    return {"fed_kinds": kinds.transform(masked),
            "fed_numeric": [as_levels(y, x) for y, x in
                            zip(numeric.transform(masked), masked, strict=True)],
            "site_mode": [mode_fill(x, x) for x in masked]}


def run_seed(sites: list[np.ndarray], seed: int, sd: np.ndarray) -> dict[str, Any]:
    """Every method's scores for one seed's hidden cells."""
    hidden = hide(sites, seed)
    masked = [np.where(mask, np.nan, x) for x, mask in zip(sites, hidden, strict=True)]
    results: dict[str, Any] = {}
    for group in (centralized(masked), federated(masked, seed)):
        for name, imputed in group.items():
            for y, xm in zip(imputed, masked, strict=True):
                observed = ~np.isnan(xm)
                assert np.array_equal(y[observed], xm[observed]), name
            results[name] = scores(imputed, sites, hidden, sd)
    return results


#: Indicator scales compared by ``--scales``: what a level mismatch adds to the squared
#: distance -> (INDICATOR_SCALE, BINARY_SCALE).
SCALES = {"1": (math.sqrt(2.0), 1.0), "2": (1.0, 1 / math.sqrt(2.0)), "4": (1 / math.sqrt(2.0),
                                                                          0.5)}


def compare_scales(sites: list[np.ndarray], seeds: int, sd: np.ndarray) -> dict[str, Any]:
    """``iim_kinds`` (centralized) per seed for each mismatch distance of :data:`SCALES`."""
    kept = encoding.INDICATOR_SCALE, encoding.BINARY_SCALE
    out: dict[str, Any] = {}
    try:
        for mismatch, (indicator, binary) in SCALES.items():
            encoding.INDICATOR_SCALE, encoding.BINARY_SCALE = indicator, binary
            out[mismatch] = {}
            for seed in range(seeds):
                hidden = hide(sites, seed)
                masked = [np.where(m, np.nan, x) for x, m in zip(sites, hidden, strict=True)]
                pooled = np.vstack(masked)
                imputed = np.split(IIMImputer(column_kinds=KINDS).fit_transform(pooled),
                                   np.cumsum([len(x) for x in masked])[:-1])
                out[mismatch][str(seed)] = scores(imputed, sites, hidden, sd)
    finally:
        encoding.INDICATOR_SCALE, encoding.BINARY_SCALE = kept
    return out


#: ``--downstream``: the regressors of ``num > 0``, the coded ones reported, and M.
DOWNSTREAM_FEATURES = ["age", "sex", "cp", "trestbps", "thalach", "exang", "oldpeak"]
DOWNSTREAM_CODED = ["sex", "cp", "exang"]
N_IMPUTATIONS = 5


def downstream_seed(sites: list[np.ndarray], seed: int) -> dict[str, Any]:
    """Per coded regressor, its logistic coefficient on the complete data, on the single
    imputation and pooled over M draws (with the between-imputation variance), and
    whether each 95% interval covers the complete-data value."""
    truth = np.vstack(sites)
    masked = np.vstack([np.where(mask, np.nan, x)
                        for x, mask in zip(sites, hide(sites, seed), strict=True)])
    chosen = [COLUMNS.index(c) for c in (*DOWNSTREAM_FEATURES, "num")]
    rows = ~np.isnan(truth[:, chosen]).any(axis=1)
    imputer = IIMImputer(column_kinds=KINDS, n_imputations=N_IMPUTATIONS,
                         random_state=seed).fit(masked)
    single, draws = imputer.transform(masked), imputer.multiple_imputations(masked)
    for draw in draws:
        assert all(np.isin(draw[:, j], levels).all() for j, (_, levels) in KINDS.items())
    out: dict[str, Any] = {"n_rows": int(rows.sum())}
    for name in DOWNSTREAM_CODED:
        position = DOWNSTREAM_FEATURES.index(name)

        def fit(table: np.ndarray, position: int = position) -> Any:
            return fit_coefficient(table[rows][:, chosen], len(DOWNSTREAM_FEATURES), position,
                                   "logistic", 0.0)

        reference, one = fit(truth).estimate, single_interval(fit(single))
        fits = [fit(draw) for draw in draws]
        pooled = pool([f.estimate for f in fits], [f.variance for f in fits],
                      df_complete=fits[0].df)
        low, high = pooled.interval(0.95)
        out[name] = {"reference": reference, "single": one.estimate,
                     "single_covers": one.covers(reference), "single_width": one.high - one.low,
                     "multiple": pooled.estimate, "multiple_covers": bool(low <= reference <= high),
                     "multiple_width": high - low, "between": pooled.between,
                     "within": pooled.within}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "categorical.json")
    parser.add_argument("--scales", action="store_true",
                        help="compare indicator scales (centralized iim_kinds only)")
    parser.add_argument("--downstream", action="store_true",
                        help="coded predictors of num > 0: single against multiple imputation")
    args = parser.parse_args(argv)
    sites = load_sites()
    sd = np.nanstd(np.vstack(sites), axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    start = time.perf_counter()
    if args.downstream:
        per_seed = {str(seed): downstream_seed(sites, seed) for seed in range(args.seeds)}
        write_results(args.out, {"protocol": __doc__, "n_imputations": N_IMPUTATIONS,
                                 "seeds": per_seed, "wall_s": time.perf_counter() - start})
        print(f"-> {args.out}", file=sys.stderr)
        return 0
    if args.scales:
        write_results(args.out, {"protocol": __doc__, "scales": compare_scales(
            sites, args.seeds, sd), "wall_s": time.perf_counter() - start})
        print(f"-> {args.out}", file=sys.stderr)
        return 0
    per_seed = {}
    for seed in range(args.seeds):
        per_seed[str(seed)] = run_seed(sites, seed, sd)
        print(f"seed {seed}: " + ", ".join(
            f"{name} acc {r['accuracy']:.3f} nrmse {r['nrmse']:.3f}"
            for name, r in per_seed[str(seed)].items()), file=sys.stderr)
    write_results(args.out, {"protocol": __doc__, "epsilon": EPSILON,
                             "hidden_fraction": HIDDEN_FRACTION, "seeds": per_seed,
                             "wall_s": time.perf_counter() - start})
    print(f"-> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
