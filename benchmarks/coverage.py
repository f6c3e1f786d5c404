"""Does the pooled interval of IIM's multiple imputation cover the true coefficient?

Each replicate draws a fresh table of 500 rows, hides one attribute in 30% of the rows at
random given the observed ones (MAR), and estimates a linear regression coefficient with a
95% interval in four ways:

    complete_data   the table before masking (the reference: what no imputation beats)
    complete_case   the rows nothing was hidden from
    single          IIMImputer's single imputation, analysed as if it were data
    multiple        IIMImputer(n_imputations=M) draws, pooled with Rubin's rules
                    (fediim.mi.pool, Barnard-Rubin df)

Two data sources:

synthetic  x1, x2, x3 jointly normal (correlation 0.5), y = 1 + x1 + 0.5 x2 - 0.5 x3 +
           N(0, 1); the estimand is y's coefficient on x1 (truth 1.0). x1 goes missing in
           30% of the rows with probability logistic in y and x2 (observed), so the
           complete cases are a biased sample.
ccpp       a resample of 500 rows (without replacement) of the full ccpp table; the
           estimand is PE's coefficient on AT, the truth the one fitted on all 9,568
           rows. AT goes missing in 30% of the rows with probability logistic in PE.

Usage::

    nice -n 10 .venv/bin/python benchmarks/coverage.py              # 200 + 200 replicates
    nice -n 10 .venv/bin/python benchmarks/coverage.py --replicates 20 --posterior half
    nice -n 10 .venv/bin/python benchmarks/coverage.py --federated 4   # + FederatedIIM arm

The federated arm (``--federated EPS``, first ``--federated-replicates`` replicates): the
replicate's 500 rows dealt into two sites of 250, one private bank at ε per site (hybrid
mode), ``federated_single`` (its single imputation) and ``federated_multiple`` (M draws,
each from a re-noised bank plus the sites' residual noise).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import expit

from fediim import FederatedIIM, IIMImputer
from fediim.impute.estimator import missing_patterns
from fediim.impute.multiple import POSTERIORS, draw_imputations
from fediim.io.json_results import write_results
from simulations.downstream import Interval, fit_coefficient, pooled_interval, single_interval
from simulations.provenance import machine_info

ROOT = Path(__file__).resolve().parent
CCPP = ROOT.parents[1] / "shared" / "datasets" / "ccpp.csv"
N_ROWS = 500
MISSING_FRACTION = 0.3
#: A replicate: (complete table, table with the hidden cells as NaN), target, coefficient.
Replicate = tuple[np.ndarray, np.ndarray]


def mar_mask(drivers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rows losing the attribute: ``round(30% of n)`` rows drawn with probability
    proportional to ``expit(standardized sum of the drivers)`` (missing at random: the
    drivers stay observed)."""
    score = drivers.sum(axis=1) if drivers.ndim == 2 else drivers
    weights = expit((score - score.mean()) / score.std())
    size = int(round(MISSING_FRACTION * len(score)))
    return rng.choice(len(score), size=size, replace=False, p=weights / weights.sum())


def synthetic_replicate(rng: np.random.Generator) -> Replicate:
    """x1, x2, x3, y (columns 0-3), x1 hidden MAR on (y, x2)."""
    covariance = np.full((3, 3), 0.5) + 0.5 * np.eye(3)
    x = rng.multivariate_normal(np.zeros(3), covariance, size=N_ROWS)
    y = 1.0 + x @ np.array([1.0, 0.5, -0.5]) + rng.standard_normal(N_ROWS)
    table = np.column_stack([x, y])
    masked = table.copy()
    masked[mar_mask(np.column_stack([y, x[:, 1]]), rng), 0] = np.nan
    return table, masked


def ccpp_source() -> tuple[Callable[[np.ndarray, np.random.Generator], Replicate], float]:
    """The ccpp replicate maker (AT hidden MAR on PE) and the full table's coefficient."""
    full = np.genfromtxt(CCPP, delimiter=",", skip_header=1)
    truth = fit_coefficient(full, target=4, coefficient=0).estimate

    def replicate(_: np.ndarray, rng: np.random.Generator) -> Replicate:
        table = full[rng.choice(len(full), size=N_ROWS, replace=False)]
        masked = table.copy()
        masked[mar_mask(table[:, 4], rng), 0] = np.nan
        return table, masked

    return replicate, truth


def intervals(table: np.ndarray, masked: np.ndarray, target: int, coefficient: int,
              n_imputations: int, posterior: str, rng: np.random.Generator
              ) -> dict[str, Interval]:
    """Each method's 95% interval for the coefficient on one replicate."""
    complete = ~np.isnan(masked).any(axis=1)
    imputer = IIMImputer().fit(masked)
    single = imputer.impute(masked)
    draws = draw_imputations(imputer, masked, single, list(missing_patterns(single.imputed)),
                             n_imputations, rng, posterior)  # type: ignore[arg-type]
    fits = [fit_coefficient(draw.values, target, coefficient) for draw in draws]
    return {
        "complete_data": single_interval(fit_coefficient(table, target, coefficient)),
        "complete_case": single_interval(fit_coefficient(masked[complete], target,
                                                         coefficient)),
        "single": single_interval(fit_coefficient(single.values, target, coefficient)),
        "multiple": pooled_interval(fits),
    }


#: Public bounds of the federated arm (domain ranges, not read off the data).
SYNTHETIC_BOUNDS = np.array([[-6.0, 6.0], [-6.0, 6.0], [-6.0, 6.0], [-12.0, 14.0]])
CCPP_BOUNDS = np.array([[-10.0, 50.0], [20.0, 90.0], [980.0, 1040.0], [20.0, 110.0],
                        [400.0, 500.0]])


def federated_intervals(table: np.ndarray, masked: np.ndarray, target: int, coefficient: int,
                        n_imputations: int, epsilon: float, bounds: np.ndarray,
                        rng: np.random.Generator) -> dict[str, Interval]:
    """The federated arm: the replicate's rows dealt into two sites of equal size, one
    private bank (hybrid mode, seeded noise), single and multiple imputation from it."""
    sites = np.array_split(masked, 2)
    seed = int(rng.integers(2**31))
    model = FederatedIIM(epsilon=epsilon, bounds=bounds, mode="hybrid", seed=seed,
                         random_state=seed, n_imputations=n_imputations).fit(sites)
    single = np.vstack(model.transform(sites))
    fits = [fit_coefficient(np.vstack(federation), target, coefficient)
            for federation in model.multiple_imputations(sites)]
    return {"federated_single": single_interval(fit_coefficient(single, target, coefficient)),
            "federated_multiple": pooled_interval(fits)}


def summarise(found: list[dict[str, Interval]], truth: float) -> dict[str, Any]:
    """Coverage, bias, RMSE and mean interval width per method over the replicates that
    ran it (the federated arm runs on the first ones only)."""
    out: dict[str, Any] = {}
    for method in dict.fromkeys(m for f in found for m in f):
        ran = [f[method] for f in found if method in f]
        estimates = np.array([interval.estimate for interval in ran])
        covered = np.array([interval.covers(truth) for interval in ran])
        widths = np.array([interval.high - interval.low for interval in ran])
        out[method] = {"coverage": float(covered.mean()), "replicates": len(ran),
                       "coverage_se": float(np.sqrt(covered.mean() * (1 - covered.mean())
                                                    / len(ran))),
                       "bias": float(estimates.mean() - truth),
                       "rmse": float(np.sqrt(np.mean((estimates - truth) ** 2))),
                       "mean_width": float(widths.mean())}
    return out


def run_source(name: str, replicate: Callable[[np.ndarray, np.random.Generator], Replicate],
               truth: float, target: int, coefficient: int, bounds: np.ndarray,
               args: argparse.Namespace) -> dict[str, Any]:
    """Every replicate of one source; its summary with the settings."""
    start = time.perf_counter()
    found = []
    for number in range(args.replicates):
        rng = np.random.default_rng([args.seed, number])
        table, masked = replicate(np.empty(0), rng)
        found.append(intervals(table, masked, target, coefficient, args.multiple,
                               args.posterior, rng))
        if args.federated is not None and number < args.federated_replicates:
            found[-1].update(federated_intervals(table, masked, target, coefficient,
                                                 args.multiple, args.federated, bounds, rng))
        if (number + 1) % 20 == 0:
            partial = summarise(found, truth)
            print(f"{name} {number + 1}: " + ", ".join(
                f"{m} {partial[m]['coverage']:.3f}" for m in partial), file=sys.stderr)
    return {"truth": truth, "replicates": args.replicates, "seconds":
            time.perf_counter() - start, "methods": summarise(found, truth)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", type=int, default=200)
    parser.add_argument("--multiple", type=int, default=5, help="M (default: 5)")
    parser.add_argument("--posterior", choices=POSTERIORS, default="half")
    parser.add_argument("--sources", nargs="+", default=["synthetic", "ccpp"],
                        choices=["synthetic", "ccpp"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--federated", type=float, metavar="EPS",
                        help="also FederatedIIM at this ε (two sites, hybrid mode)")
    parser.add_argument("--federated-replicates", type=int, default=100,
                        help="replicates of the (slower) federated arm (default: 100)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "coverage.json")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"settings": {
        "n_rows": N_ROWS, "missing_fraction": MISSING_FRACTION, "n_imputations":
        args.multiple, "posterior": args.posterior, "imputer": "IIMImputer() defaults",
        "seed": args.seed, "federated_epsilon": args.federated,
        "federated_replicates": args.federated_replicates}, "machine": machine_info()}
    if "synthetic" in args.sources:
        results["synthetic"] = run_source("synthetic", lambda _, rng: synthetic_replicate(rng),
                                          1.0, 3, 0, SYNTHETIC_BOUNDS, args)
    if "ccpp" in args.sources:
        replicate, truth = ccpp_source()
        results["ccpp"] = run_source("ccpp", replicate, truth, 4, 0, CCPP_BOUNDS, args)
    write_results(args.out, results)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
