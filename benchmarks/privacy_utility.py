"""Privacy-utility of federated IIM: NRMSE against each site's epsilon, four federations.

Scenarios (sites hold disjoint rows over one schema)
    heart        the four UCI Heart Disease hospitals (cleveland, hungarian, switzerland, va);
                 columns ca, thal, slope dropped; chol == 0 and trestbps == 0 are missing
                 codes (NaN). Real missingness stays; those cells have no truth, not scored.
    ccpp_iid     UCI CCPP split into 4 equal sites by a seeded random permutation
                 (``default_rng(10_000 + seed)``).
    ccpp_noniid  UCI CCPP sorted by AT (the first attribute), 4 contiguous blocks.
    wine         red vs white wine quality as 2 sites (same 12 columns).

Ground truth: per site, in site order, ``round(5%)`` of the site's complete tuples lose one
uniformly random attribute (one ``np.random.default_rng(seed)`` per scenario and seed).
A column a site never observes (switzerland's chol) does not count against "complete" and
is never masked there. NRMSE = sqrt(mean over masked cells of ((imputed - truth) / std)^2),
std = the attribute's std (ddof=0) over the scenario's pooled complete rows; reported pooled
over all sites and per site.

Methods
    local           IIMImputer() on each site alone (no sharing, no privacy cost)
    centralized     IIMImputer() on the vertical stack of all masked sites: non-private ceiling
    federated       FederatedIIM bank candidates only, at each epsilon
    hybrid          per pattern and target, a blend of the site's own IIM, the other sites'
                    cells recentred by the site's mean residual, and the site mean, with
                    weights chosen on the site's own rows (local side cross-fitted)
    federated_mean  the federation-wide mean read off the bank
Per (scenario, seed, epsilon) the bank is fitted once (each site spends its (epsilon, delta =
1e-6) budget once); federated, hybrid and federated_mean all impute from that same bank with
``site_impute`` (post-processing, no further spend). Bounds are public domain ranges (below).

Usage::

    .venv/bin/python benchmarks/privacy_utility.py
    .venv/bin/python benchmarks/privacy_utility.py --scenarios heart --seeds 0 --eps 1,inf
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from _common import DEFAULT_DATASETS, fmt, machine_info, write_json_atomic

from fediim import IIMImputer
from fediim.federated import FederatedIIM, site_impute

SCENARIOS = ("heart", "ccpp_iid", "ccpp_noniid", "wine")
SEEDS = (0, 1, 2)
EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0, math.inf)
DELTA = 1e-6
K = 10
MISSING_ROW_FRACTION = 0.05
HEART_SITES = ("cleveland", "hungarian", "switzerland", "va")
HEART_DROP = ("ca", "thal", "slope")
PRIVATE_METHODS = ("federated", "hybrid", "federated_mean")
BASELINES = ("local", "centralized")
SITE_MODE = {"federated": "federated", "hybrid": "hybrid", "federated_mean": "mean"}

# Public bounds per attribute: DOMAIN ranges (physiology, physics, oenology), deliberately
# generous, chosen without looking at the data's own min/max (which would leak). Values
# outside are clamped before any release.
BOUNDS: dict[str, dict[str, tuple[float, float]]] = {
    "heart": {
        "age": (0.0, 120.0),          # years
        "sex": (0.0, 1.0),            # binary code
        "cp": (1.0, 4.0),             # chest-pain type code 1..4
        "trestbps": (50.0, 250.0),    # resting systolic blood pressure, mm Hg
        "chol": (50.0, 700.0),        # serum cholesterol, mg/dl
        "fbs": (0.0, 1.0),            # fasting blood sugar > 120 mg/dl, binary
        "restecg": (0.0, 2.0),        # resting ECG code 0..2
        "thalach": (50.0, 250.0),     # maximum heart rate, bpm
        "exang": (0.0, 1.0),          # exercise-induced angina, binary
        "oldpeak": (-3.0, 7.0),       # ST depression, mm
        "num": (0.0, 4.0),            # diagnosis code 0..4
    },
    "ccpp": {
        "AT": (-10.0, 40.0),          # ambient temperature, deg C
        "V": (20.0, 90.0),            # exhaust vacuum, cm Hg
        "AP": (990.0, 1040.0),        # ambient pressure, mbar
        "RH": (10.0, 110.0),          # relative humidity, %
        "PE": (400.0, 500.0),         # net electrical output, MW (plant rating)
    },
    "wine": {
        "fixed_acidity": (0.0, 20.0),           # g(tartaric acid)/L
        "volatile_acidity": (0.0, 2.0),         # g(acetic acid)/L
        "citric_acid": (0.0, 2.0),              # g/L
        "residual_sugar": (0.0, 80.0),          # g/L (dry to sweet)
        "chlorides": (0.0, 1.0),                # g(NaCl)/L
        "free_sulfur_dioxide": (0.0, 300.0),    # mg/L
        "total_sulfur_dioxide": (0.0, 500.0),   # mg/L
        "density": (0.98, 1.05),                # g/cm^3
        "pH": (2.5, 4.5),
        "sulphates": (0.0, 2.5),                # g(potassium sulphate)/L
        "alcohol": (7.0, 16.0),                 # % vol
        "quality": (0.0, 10.0),                 # sensory score 0..10
    },
}


# -- data ---------------------------------------------------------------------------------
def _read(path: Path) -> Any:
    import pandas as pd

    return pd.read_csv(path)


def load_scenario(name: str, datasets: Path, seed: int
                  ) -> tuple[list[str], list[np.ndarray], list[str], np.ndarray]:
    """(site names, site tables with real NaN, column names, (m, 2) public bounds)."""
    if name == "heart":
        frames = []
        for s in HEART_SITES:
            df = _read(datasets / "heart" / f"{s}.csv").drop(columns=list(HEART_DROP))
            for col in ("chol", "trestbps"):  # 0 is the source's missing code for both
                df.loc[df[col] == 0, col] = np.nan
            frames.append(df)
        cols = [str(c) for c in frames[0].columns]
        sites = [f[cols].to_numpy(dtype=np.float64) for f in frames]
        names, family = list(HEART_SITES), "heart"
    elif name in ("ccpp_iid", "ccpp_noniid"):
        df = _read(datasets / "ccpp.csv")
        cols = [str(c) for c in df.columns]
        x = df.to_numpy(dtype=np.float64)
        if name == "ccpp_iid":
            order = np.random.default_rng(10_000 + seed).permutation(len(x))
        else:
            order = np.argsort(x[:, 0], kind="stable")
        sites = [x[idx] for idx in np.array_split(order, 4)]
        names, family = [f"site{i}" for i in range(4)], "ccpp"
    elif name == "wine":
        red, white = _read(datasets / "wine_red.csv"), _read(datasets / "wine_white.csv")
        cols = [str(c) for c in red.columns]
        if list(white.columns) != cols:
            raise SystemExit("wine_red.csv and wine_white.csv have different columns")
        sites = [red.to_numpy(dtype=np.float64), white[cols].to_numpy(dtype=np.float64)]
        names, family = ["red", "white"], "wine"
    else:
        raise ValueError(f"unknown scenario {name!r}")
    bounds = np.array([BOUNDS[family][c] for c in cols], dtype=np.float64)
    return names, sites, cols, bounds


def mask_sites(sites: Sequence[np.ndarray], seed: int, frac: float = MISSING_ROW_FRACTION
               ) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    """Per site: ``round(frac * n_complete)`` complete rows lose one random attribute.

    Columns a site never observes are ignored when judging "complete" and never masked.
    """
    rng = np.random.default_rng(seed)
    masked, cells = [], []
    for x in sites:
        seen = np.flatnonzero(~np.isnan(x).all(axis=0))
        complete = np.flatnonzero(~np.isnan(x[:, seen]).any(axis=1))
        k = int(round(frac * len(complete)))
        rows = np.sort(rng.choice(complete, size=k, replace=False))
        cols = rng.choice(seen, size=k)
        xm = x.copy()
        xm[rows, cols] = np.nan
        masked.append(xm)
        cells.append((rows, cols))
    return masked, cells


def pooled_std(sites: Sequence[np.ndarray]) -> np.ndarray:
    allx = np.vstack(sites)
    sd = allx[~np.isnan(allx).any(axis=1)].std(axis=0)
    return np.where(sd > 0, sd, 1.0)


def score(imputed: Sequence[np.ndarray], truth: Sequence[np.ndarray], masked: Sequence[np.ndarray],
          cells: Sequence[tuple[np.ndarray, np.ndarray]], sd: np.ndarray, names: Sequence[str]
          ) -> dict[str, Any]:
    """Pooled and per-site NRMSE; checks observed cells are unchanged and imputations finite."""
    errs, per_site = [], {}
    for out, x, xm, (r, c), sid in zip(imputed, truth, masked, cells, names, strict=True):
        obs = ~np.isnan(xm)
        if not np.array_equal(out[obs], xm[obs]):
            raise RuntimeError(f"{sid}: observed cells changed")
        if not np.all(np.isfinite(out[r, c])):
            raise RuntimeError(f"{sid}: non-finite imputed values at masked cells")
        e = (out[r, c] - x[r, c]) / sd[c]
        errs.append(e)
        per_site[sid] = float(np.sqrt(np.mean(e**2))) if e.size else None
    allerr = np.concatenate(errs)
    return {"nrmse": float(np.sqrt(np.mean(allerr**2))), "nrmse_site": per_site}


# -- one scenario x seed ------------------------------------------------------------------
def _eps_key(eps: float | None) -> str | None:
    if eps is None:
        return None
    return "inf" if math.isinf(eps) else f"{eps:g}"


def local_iim(x: np.ndarray) -> np.ndarray:
    """IIMImputer on one site alone, over the columns the site observes at all.

    A column the site never observes (switzerland's chol) cannot be imputed locally: its
    cells stay NaN (they have no truth and are not scored).
    """
    seen = np.flatnonzero(~np.isnan(x).all(axis=0))
    out = x.copy()
    out[:, seen] = IIMImputer(n_neighbors=K).fit_transform(x[:, seen])
    return out


def run_scenario_seed(name: str, datasets: Path, seed: int, epsilons: Sequence[float]
                      ) -> list[dict[str, Any]]:
    names, sites, cols, bounds = load_scenario(name, datasets, seed)
    masked, cells = mask_sites(sites, seed)
    sd = pooled_std(sites)
    base = {"scenario": name, "seed": seed, "sites": names,
            "n_rows_site": {s: int(len(x)) for s, x in zip(names, sites, strict=True)},
            "n_masked_site": {s: int(len(c[0])) for s, c in zip(names, cells, strict=True)}}
    recs: list[dict[str, Any]] = []

    def emit(method: str, eps: float | None, out: list[np.ndarray], **extra: Any) -> None:
        rec = {**base, "method": method, "epsilon": _eps_key(eps),
               **score(out, sites, masked, cells, sd, names), **extra}
        recs.append(rec)
        print(f"{name:11s} seed={seed} {method:14s} eps={rec['epsilon'] or '-':>4s} "
              f"nrmse={rec['nrmse']:.3f} time={rec['time_s']:.2f}s", file=sys.stderr,
              flush=True)

    t0 = time.perf_counter()
    emit("local", None, [local_iim(x) for x in masked], time_s=time.perf_counter() - t0)

    t0 = time.perf_counter()
    pooled = IIMImputer(n_neighbors=K).fit_transform(np.vstack(masked))
    split = np.cumsum([len(x) for x in masked])[:-1]
    emit("centralized", None, np.split(pooled, split), time_s=time.perf_counter() - t0)

    for eps in epsilons:
        t0 = time.perf_counter()
        f = FederatedIIM(k=K, epsilon=eps, delta=DELTA, bounds=bounds, mode="federated",
                         seed=seed).fit(masked, site_ids=names)
        fit_s = time.perf_counter() - t0
        bank_site = {s: int(np.sum(f.bank_.site == s)) for s in names}
        privacy = {s: (None if led is None else {"rho": float(led.spent_rho),
                                                  "epsilon": float(led.epsilon(DELTA))})
                   for s, led in zip(names, f.ledgers_, strict=True)}
        for method in PRIVATE_METHODS:
            t1 = time.perf_counter()
            out = [site_impute(x, f.bank_, f.bounds_, mode=SITE_MODE[method],
                               n_neighbors=K, site_id=s).values
                   for x, s in zip(masked, names, strict=True)]
            imp_s = time.perf_counter() - t1
            emit(method, eps, out, time_s=fit_s + imp_s, fit_s=fit_s, impute_s=imp_s,
                 bank_cells=int(f.bank_.n_cells), bank_cells_site=bank_site,
                 rho_budget=float(f.plan_.rho_total) if np.isfinite(f.plan_.rho_total)
                 else None, privacy_site=privacy)
    return recs


# -- summary / output ---------------------------------------------------------------------
def _mean_sd(vals: Sequence[float | None]) -> tuple[float | None, float | None]:
    v = [x for x in vals if x is not None]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None)


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """scenario -> method -> epsilon key ("-" for non-private) -> mean/sd over seeds."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["scenario"], r["method"], r["epsilon"] or "-"), []).append(r)
    out: dict[str, Any] = {}
    for (sc, meth, ek), rs in groups.items():
        mean, sd = _mean_sd([r["nrmse"] for r in rs])
        cell: dict[str, Any] = {"n_seeds": len(rs), "nrmse_mean": mean, "nrmse_sd": sd,
                                "nrmse_site": {}, "time_s_mean": _mean_sd(
                                    [r["time_s"] for r in rs])[0]}
        for s in rs[0]["sites"]:
            m, d = _mean_sd([r["nrmse_site"][s] for r in rs])
            cell["nrmse_site"][s] = {"mean": m, "sd": d,
                                     "n_masked_total": sum(r["n_masked_site"][s] for r in rs)}
        if "bank_cells" in rs[0]:
            cell["bank_cells_mean"] = _mean_sd([r["bank_cells"] for r in rs])[0]
            priv = rs[0]["privacy_site"]
            cell["epsilon_spent_site"] = {s: (None if p is None else p["epsilon"])
                                          for s, p in priv.items()}
            cell["rho_spent_site"] = {s: (None if p is None else p["rho"])
                                      for s, p in priv.items()}
        out.setdefault(sc, {}).setdefault(meth, {})[ek] = cell
    return out


def _paired_hybrid_minus_local(records: list[dict[str, Any]], scenario: str
                               ) -> dict[str, dict[str, float | bool | int]]:
    """Per epsilon: hybrid - local pooled NRMSE, paired by seed (same masked cells).

    ``within_noise``: the mean difference is at most two standard errors above zero (the
    seeds do not show hybrid to be worse than local).
    """
    local = {r["seed"]: r["nrmse"] for r in records
             if r["scenario"] == scenario and r["method"] == "local"}
    diffs: dict[str, list[float]] = {}
    for r in records:
        if r["scenario"] == scenario and r["method"] == "hybrid" and r["seed"] in local:
            diffs.setdefault(r["epsilon"], []).append(r["nrmse"] - local[r["seed"]])
    out: dict[str, dict[str, float | bool | int]] = {}
    for ek, d in diffs.items():
        mean = float(np.mean(d))
        se = float(np.std(d, ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.inf
        out[ek] = {"mean": mean, "se": se, "n_seeds": len(d),
                   "within_noise": bool(mean <= 2 * se)}
    return out


def checks(summary: dict[str, Any], records: list[dict[str, Any]] | None = None
           ) -> dict[str, Any]:
    """Headline comparisons: hybrid vs local per epsilon (raw and paired by seed);
    federated / centralized ratios."""
    res: dict[str, Any] = {}
    for sc, meths in summary.items():
        c: dict[str, Any] = {}
        if records:
            paired = _paired_hybrid_minus_local(records, sc)
            c["hybrid_minus_local_paired"] = paired
            c["hybrid_not_worse_within_noise_all_eps"] = all(
                v["within_noise"] for v in paired.values())
        loc = meths.get("local", {}).get("-", {}).get("nrmse_mean")
        cen = meths.get("centralized", {}).get("-", {}).get("nrmse_mean")
        if loc is not None and "hybrid" in meths:
            worse = [ek for ek, v in meths["hybrid"].items() if v["nrmse_mean"] > loc]
            c["hybrid_le_local_all_eps"] = not worse
            c["hybrid_worse_than_local_at"] = worse
        if cen and "federated" in meths:
            c["federated_over_centralized"] = {
                ek: v["nrmse_mean"] / cen for ek, v in meths["federated"].items()}
        if cen and "hybrid" in meths:
            c["hybrid_over_centralized"] = {
                ek: v["nrmse_mean"] / cen for ek, v in meths["hybrid"].items()}
        res[sc] = c
    return res


def _eps_order(keys: Sequence[str]) -> list[str]:
    return sorted(keys, key=lambda k: math.inf if k == "inf" else float(k))


def markdown(summary: dict[str, Any], eps_keys: Sequence[str]) -> str:
    head = ["ε=" + ("∞" if k == "inf" else k) for k in eps_keys]
    lines = ["Pooled NRMSE, mean ± sd over seeds (ε per site, δ = 1e-6; local and "
             "centralized are non-private)", "",
             "| scenario | method | non-private | " + " | ".join(head) + " |",
             "|---" * (3 + len(head)) + "|"]

    def cell(c: dict[str, Any] | None) -> str:
        if c is None:
            return ""
        s = fmt(c["nrmse_mean"])
        return s + (f" ± {c['nrmse_sd']:.3f}" if c["nrmse_sd"] is not None else "")

    for sc, meths in summary.items():
        for meth in (*BASELINES, *PRIVATE_METHODS):
            if meth not in meths:
                continue
            if meth in BASELINES:
                row = [cell(meths[meth].get("-"))] + [""] * len(eps_keys)
            else:
                row = [""] + [cell(meths[meth].get(k)) for k in eps_keys]
            lines.append(f"| {sc} | {meth} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(summary: dict[str, Any], eps_keys: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [float(k) for k in eps_keys if k != "inf"]
    inf_x = (max(finite) * 2.5) if finite else 1.0
    xs = {k: (inf_x if k == "inf" else float(k)) for k in eps_keys}
    scen = list(summary)
    ncol = 2 if len(scen) > 1 else 1
    nrow = math.ceil(len(scen) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.6 * ncol, 4.0 * nrow), squeeze=False)
    style = {"federated": ("tab:blue", "o"), "hybrid": ("tab:green", "s"),
             "federated_mean": ("tab:gray", "^")}
    for ax, sc in zip(axes.ravel(), scen, strict=False):
        meths = summary[sc]
        for meth, (color, marker) in style.items():
            if meth not in meths:
                continue
            ks = [k for k in eps_keys if k in meths[meth]]
            y = [meths[meth][k]["nrmse_mean"] for k in ks]
            e = [meths[meth][k]["nrmse_sd"] or 0.0 for k in ks]
            ax.errorbar([xs[k] for k in ks], y, yerr=e, color=color, marker=marker,
                        capsize=3, label=meth.replace("_", " "))
        for meth, color, ls in (("local", "tab:red", "--"), ("centralized", "black", ":")):
            c = meths.get(meth, {}).get("-")
            if c is not None:
                ax.axhline(c["nrmse_mean"], color=color, ls=ls,
                           label=f"{meth} ({c['nrmse_mean']:.3f})")
                if c["nrmse_sd"]:
                    ax.axhspan(c["nrmse_mean"] - c["nrmse_sd"], c["nrmse_mean"] + c["nrmse_sd"],
                               color=color, alpha=0.08, lw=0)
        ax.set_xscale("log")
        ax.set_xticks([xs[k] for k in eps_keys])
        ax.set_xticklabels(["∞" if k == "inf" else k for k in eps_keys])
        ax.minorticks_off()
        if "inf" in eps_keys and finite:
            ax.axvline(math.sqrt(max(finite) * inf_x), color="0.8", lw=0.8)
        ax.set_xlabel("ε per site (δ = 1e-6)")
        ax.set_ylabel("pooled NRMSE")
        ax.set_title(sc)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(scen):]:
        ax.set_visible(False)
    fig.suptitle("Federated IIM: privacy vs utility (error bars, shaded bands: sd over seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    os.replace(tmp, path)


def _csv_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _eps_list(s: str) -> list[float]:
    return [math.inf if x.lower() in ("inf", "∞") else float(x) for x in _csv_list(s)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    here = Path(__file__).resolve().parent
    ap.add_argument("--datasets", type=Path, default=DEFAULT_DATASETS,
                    help=f"folder with the CSVs (default: {DEFAULT_DATASETS})")
    ap.add_argument("--scenarios", type=_csv_list, default=list(SCENARIOS),
                    help=f"comma list from {','.join(SCENARIOS)}")
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in _csv_list(s)],
                    default=list(SEEDS), help="comma list of seeds (default 0,1,2)")
    ap.add_argument("--eps", type=_eps_list, default=list(EPSILONS),
                    help="comma list of per-site epsilons, 'inf' allowed "
                         "(default 0.5,1,2,4,8,inf)")
    ap.add_argument("--out", type=Path, default=here / "results" / "privacy_utility.json",
                    help="JSON output; the PNG goes beside it with the same stem")
    ap.add_argument("--resummarise", type=Path, default=None, metavar="JSON",
                    help="recompute summary/checks/table/plot of an earlier results JSON "
                         "from its per-seed records (no imputation is run)")
    args = ap.parse_args(argv)
    if args.resummarise is not None:
        return resummarise(args.resummarise)

    bad = [s for s in args.scenarios if s not in SCENARIOS]
    if bad:
        ap.error(f"unknown scenario: {', '.join(bad)}")
    if any(not e > 0 for e in args.eps):
        ap.error("epsilons must be > 0 (or inf)")
    if not args.datasets.is_dir():
        ap.error(f"datasets folder not found: {args.datasets} (use --datasets DIR)")

    t_start = time.perf_counter()
    eps_keys = _eps_order([_eps_key(e) for e in args.eps])
    payload: dict[str, Any] = {
        "benchmark": "privacy_utility",
        "machine": machine_info(),
        "protocol": {
            "scenarios": args.scenarios,
            "seeds": args.seeds,
            "epsilons": eps_keys,
            "delta": DELTA,
            "k": K,
            "missing": "per site, round(5% of its complete rows) lose one uniformly random "
                       "attribute; one default_rng(seed) per scenario+seed, sites in order; "
                       "columns a site never observes are ignored and never masked",
            "metric": "NRMSE over masked cells, error / attribute std (ddof=0) over the "
                      "scenario's pooled complete rows; pooled over sites and per site",
            "summary_sd": "sample sd over seeds (ddof=1)",
            "privacy": "one FederatedIIM fit (mode federated) per scenario+seed+epsilon; "
                       "federated, hybrid and federated_mean impute from that same bank "
                       "(site_impute), so the spend is one fit per site",
            "time": "local/centralized: fit+transform of all sites; private methods: "
                    "time_s = shared fit_s + that mode's impute_s",
            "bounds": {fam: {c: list(v) for c, v in b.items()} for fam, b in BOUNDS.items()},
            "heart": "columns ca, thal, slope dropped; chol == 0 and trestbps == 0 -> NaN",
            "datasets_dir": str(args.datasets),
        },
        "records": [],
        "summary": {},
        "checks": {},
    }
    records: list[dict[str, Any]] = payload["records"]
    for sc in args.scenarios:
        for seed in args.seeds:
            records.extend(run_scenario_seed(sc, args.datasets, seed, args.eps))
        payload["summary"] = summarise(records)
        write_json_atomic(args.out, _json_safe(payload))  # partial results survive
    payload["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    payload["total_wall_s"] = time.perf_counter() - t_start
    _finish(payload, args.out)
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')} in "
          f"{payload['total_wall_s']:.0f} s")
    return 0


def _finish(payload: dict[str, Any], path: Path) -> None:
    """Summary and checks from the payload's records; write JSON and PNG; print the table."""
    records = payload["records"]
    payload["summary"] = summarise(records)
    payload["checks"] = checks(payload["summary"], records)
    write_json_atomic(path, _json_safe(payload))
    eps_keys = payload["protocol"]["epsilons"]
    plot(payload["summary"], eps_keys, path.with_suffix(".png"))
    print(markdown(payload["summary"], eps_keys))
    print()
    _print_checks(payload["checks"])


def _print_checks(checks_: dict[str, Any]) -> None:
    for sc, c in checks_.items():
        print(f"{sc}: hybrid <= local at every ε: {c.get('hybrid_le_local_all_eps')}"
              + (f" (worse at {c['hybrid_worse_than_local_at']})"
                 if c.get("hybrid_worse_than_local_at") else ""))
        paired = c.get("hybrid_minus_local_paired", {})
        if paired:
            print("    paired by seed, hybrid - local: " + ", ".join(
                f"ε={ek}: {v['mean']:+.3f} ± {v['se']:.3f}" for ek, v in
                sorted(paired.items(),
                       key=lambda kv: math.inf if kv[0] == "inf" else float(kv[0])))
                + f"  -> not worse within noise: {c['hybrid_not_worse_within_noise_all_eps']}")


def resummarise(path: Path) -> int:
    """Recompute summary, checks, table and plot of a results JSON from its records."""
    import json

    _finish(json.loads(path.read_text()), path)
    return 0


def _json_safe(obj: Any) -> Any:
    """Replace non-finite floats by None (strict JSON has no inf/NaN)."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)) and not np.isfinite(obj):
        return None
    return obj


if __name__ == "__main__":
    sys.exit(main())
