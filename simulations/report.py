"""A study's outputs: results JSON and CSV, three plots, and ``report.md``.

Every file is written atomically (``fediim.io.atomic``); the report is written last.
Plots need matplotlib (``pip install 'fediim[dev]'``); without it the report says so and
keeps its tables.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fediim.io.atomic import atomic_write_bytes, atomic_write_text
from simulations.config import METHODS, PRIVATE_METHODS, Study, eps_key
from simulations.provenance import StudyRun, machine_info

__all__ = ["METHOD_INFO", "summarise", "table_text", "write_outputs"]

NP = "-"  # epsilon key of non-private cells

#: method -> (what it is, what it shares / its privacy)
METHOD_INFO: dict[str, tuple[str, str]] = {
    "local": ("fediim IIM on each site alone", "nothing leaves the site"),
    "centralized": ("fediim IIM on all sites' rows pooled",
                    "NOT private: every raw record is pooled (the accuracy ceiling)"),
    "federated": ("fediim: candidates from the private model bank only",
                  "noised cell statistics, (ε, δ)-DP per site"),
    "hybrid": ("fediim: the private bank blended with the site's own exact IIM (blend "
               "weight chosen on the site's own rows)", "same release as federated"),
    "federated_mean": ("fediim: the federation-wide column means read off the bank",
                       "same release as federated"),
    "knn": ("scikit-learn KNNImputer(k) on z-scored data, all sites pooled",
            "NOT private: raw records pooled"),
    "mean": ("column means of all sites pooled", "NOT private: raw records pooled"),
    "mice": ("scikit-learn IterativeImputer (MICE), all sites pooled",
             "NOT private: raw records pooled"),
    "missforest": ("MissForest-style IterativeImputer over ExtraTrees(100), all sites pooled",
                   "NOT private: raw records pooled"),
    "knn_local": ("KNNImputer(k), z-scored, each site alone", "nothing leaves the site"),
    "mean_local": ("column means of each site alone", "nothing leaves the site"),
    "mice_local": ("IterativeImputer (MICE), each site alone", "nothing leaves the site"),
    "missforest_local": ("MissForest-style, each site alone", "nothing leaves the site"),
}

_COLORS = {m: c for m, c in zip(
    ("centralized", "local", "federated", "hybrid", "federated_mean", "knn", "mean", "mice",
     "missforest", "knn_local", "mean_local", "mice_local", "missforest_local"),
    ("black", "tab:red", "tab:blue", "tab:green", "tab:gray", "tab:orange", "tab:brown",
     "tab:purple", "tab:olive", "tab:orange", "tab:brown", "tab:purple", "tab:olive"),
    strict=True)}


# -- numbers ------------------------------------------------------------------------------
def _mean_sd(vals: Sequence[float | None]) -> tuple[float | None, float | None]:
    v = [x for x in vals if x is not None]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None)


def _eps_sort(k: str) -> float:
    return -1.0 if k == NP else (math.inf if k == "inf" else float(k))


def summarise(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """dataset -> method -> epsilon key (``"-"`` if non-private) -> statistics over seeds."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["method"], r["epsilon"] or NP), []).append(r)
    out: dict[str, Any] = {}
    for (ds, meth, ek), rs in groups.items():
        vals = [r["nrmse"] for r in rs]
        mean, sd = _mean_sd(vals)
        cell: dict[str, Any] = {
            "n_seeds": len(rs), "seeds": [r["seed"] for r in rs], "nrmse_seeds": vals,
            "nrmse_mean": mean, "nrmse_sd": sd, "nrmse_min": min(vals), "nrmse_max": max(vals),
            "n_masked_mean": float(np.mean([r["n_masked"] for r in rs])),
            "time_s_mean": float(np.mean([r["time_s"] for r in rs])), "nrmse_site": {},
        }
        for s in rs[0]["sites"]:
            m, d = _mean_sd([r["nrmse_site"].get(s) for r in rs])
            cell["nrmse_site"][s] = {"mean": m, "sd": d}
        if rs[0].get("privacy_site") is not None:
            priv: dict[str, Any] = {}
            for s in rs[0]["sites"]:
                ps = [r["privacy_site"][s] for r in rs if r["privacy_site"].get(s)]
                if ps:
                    priv[s] = {k: float(np.mean([p[k] for p in ps]))
                               for k in ("epsilon_spent", "rho_spent", "rho_budget")}
            cell["privacy_site"] = priv or None
            cell["bank_cells_site"] = {s: float(np.mean([r["bank_cells_site"][s] for r in rs]))
                                       for s in rs[0]["sites"]}
        out.setdefault(ds, {}).setdefault(meth, {})[ek] = cell
    for ds in out:
        out[ds] = {m: dict(sorted(v.items(), key=lambda kv: _eps_sort(kv[0])))
                   for m, v in sorted(out[ds].items(), key=lambda kv: METHODS.index(kv[0]))}
    return out


def _fmt(x: float | None, d: int = 3) -> str:
    return "—" if x is None else f"{x:.{d}f}"


def _cell_text(c: dict[str, Any] | None, sd: bool = True) -> str:
    if c is None:
        return ""
    s = _fmt(c["nrmse_mean"])
    if sd and c["nrmse_sd"] is not None:
        s += f" ± {c['nrmse_sd']:.3f}"
    return s


def _eps_label(k: str) -> str:
    return "∞" if k == "inf" else k


def _eps_keys(study: Study) -> list[str]:
    return [eps_key(e) or "" for e in study.config.study.epsilons] if study.private_methods \
        else []


def table_text(summary: dict[str, Any], study: Study, dataset: str, *, markdown: bool,
               sd: bool = True) -> str:
    """Method x epsilon NRMSE table (mean ± sd over seeds) for one dataset."""
    ek = _eps_keys(study)
    head = ["method", "no DP"] + [f"ε={_eps_label(k)}" for k in ek]
    rows = []
    for meth in study.config.study.methods:
        cells = summary.get(dataset, {}).get(meth, {})
        if meth in PRIVATE_METHODS:
            row = [meth, ""] + [_cell_text(cells.get(k), sd) for k in ek]
        else:
            row = [meth, _cell_text(cells.get(NP), sd)] + [""] * len(ek)
        rows.append(row)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
                     for r in [head, *rows])


def privacy_rows(summary: dict[str, Any], study: Study, dataset: str
                 ) -> tuple[list[str], list[list[str]]]:
    """Per site: the ε each site spent (of its budget) at each finite ε of the grid."""
    priv = [m for m in study.private_methods if m in summary.get(dataset, {})]
    finite = [k for k in _eps_keys(study) if k != "inf"]
    if not priv or not finite:
        return [], []
    cells = summary[dataset][priv[0]]
    sites = next(iter(cells.values()))["nrmse_site"].keys()
    head = ["site"] + [f"ε={k}" for k in finite]
    rows = []
    for s in sites:
        row = [s]
        for k in finite:
            p = (cells.get(k, {}).get("privacy_site") or {}).get(s)
            row.append("" if p is None else f"{p['epsilon_spent']:.2f} of {k} "
                                            f"(ρ {p['rho_spent']:.3g})")
        rows.append(row)
    return head, rows


# -- plots --------------------------------------------------------------------------------
def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


def _axes(plt: Any, n: int, w: float = 7.2, h: float = 4.2) -> tuple[Any, Any]:
    ncol = min(n, 2)
    nrow = math.ceil(n / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(w * ncol, h * nrow), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, axes.ravel()


def plot_nrmse(summary: dict[str, Any], study: Study, path: Path) -> None:
    plt = _pyplot()
    ek = _eps_keys(study)
    finite = [float(k) for k in ek if k != "inf"]
    inf_x = max(finite) * 2.5 if finite else 1.0
    xs = {k: inf_x if k == "inf" else float(k) for k in ek}
    dsets = list(summary)
    fig, axes = _axes(plt, len(dsets))
    for ax, ds in zip(axes, dsets, strict=False):
        for meth, cells in summary[ds].items():
            color = _COLORS.get(meth, None)
            if meth in PRIVATE_METHODS:
                ks = [k for k in ek if k in cells]
                x = [xs[k] for k in ks]
                y = [cells[k]["nrmse_mean"] for k in ks]
                ax.plot(x, y, marker="o", color=color, label=meth)
                ax.fill_between(x, [cells[k]["nrmse_min"] for k in ks],
                                [cells[k]["nrmse_max"] for k in ks], color=color, alpha=0.15,
                                lw=0)
                for k in ks:
                    ax.scatter([xs[k]] * len(cells[k]["nrmse_seeds"]), cells[k]["nrmse_seeds"],
                               color=color, s=8, alpha=0.6)
            elif NP in cells:
                c = cells[NP]
                ax.axhline(c["nrmse_mean"], color=color, ls="--", lw=1.2,
                           label=f"{meth} ({c['nrmse_mean']:.3f})")
        if ek:
            ax.set_xscale("log")
            ax.set_xticks([xs[k] for k in ek])
            ax.set_xticklabels([_eps_label(k) for k in ek])
            ax.minorticks_off()
            ax.set_xlabel(f"ε per site (δ = {study.config.study.delta:g})")
        ax.axhline(1.0, color="0.6", lw=0.6, ls=":")
        ax.set_ylabel("NRMSE (lower is better; 1 ≈ column mean)")
        ax.set_title(ds)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("NRMSE vs each site's privacy budget\n(private: mean over seeds, shaded "
                 "min–max, dots = seeds; dashed: no budget)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_sites(summary: dict[str, Any], study: Study, path: Path) -> None:
    plt = _pyplot()
    rep = eps_key(study.report_epsilon) if study.private_methods else None
    dsets = list(summary)
    fig, axes = _axes(plt, len(dsets), w=6.4)
    for ax, ds in zip(axes, dsets, strict=False):
        meths = [(m, c.get(rep) if m in PRIVATE_METHODS else c.get(NP))
                 for m, c in summary[ds].items()]
        meths = [(m, c) for m, c in meths if c is not None]
        if not meths:
            continue
        sites = list(meths[0][1]["nrmse_site"])
        width = 0.8 / len(meths)
        for i, (m, c) in enumerate(meths):
            y = [c["nrmse_site"][s]["mean"] or 0.0 for s in sites]
            e = [c["nrmse_site"][s]["sd"] or 0.0 for s in sites]
            ax.bar(np.arange(len(sites)) + (i - (len(meths) - 1) / 2) * width, y, width,
                   yerr=e, capsize=2, color=_COLORS.get(m), label=m
                   + (f" (ε={_eps_label(rep or '')})" if m in PRIVATE_METHODS else ""))
        ax.set_xticks(np.arange(len(sites)))
        ax.set_xticklabels(sites, rotation=20 if len(sites) > 4 else 0)
        ax.axhline(1.0, color="0.6", lw=0.6, ls=":")
        ax.set_ylabel("NRMSE at the site (mean ± sd over seeds)")
        ax.set_title(ds)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("Per-site error", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_privacy(summary: dict[str, Any], study: Study, path: Path) -> bool:
    finite = [k for k in _eps_keys(study) if k != "inf"]
    priv = study.private_methods
    if not priv or not finite:
        return False
    plt = _pyplot()
    dsets = [d for d in summary if priv[0] in summary[d]]
    fig, axes = _axes(plt, len(dsets))
    for ax, ds in zip(axes, dsets, strict=False):
        cells = summary[ds][priv[0]]
        sites = list(next(iter(cells.values()))["nrmse_site"])
        width = 0.8 / len(finite)
        cmap = plt.get_cmap("viridis")
        for i, k in enumerate(finite):
            p = cells.get(k, {}).get("privacy_site") or {}
            y = [p[s]["epsilon_spent"] if s in p else 0.0 for s in sites]
            x = np.arange(len(sites)) + (i - (len(finite) - 1) / 2) * width
            color = cmap(i / max(len(finite) - 1, 1))
            ax.bar(x, y, width, color=color, label=f"budget ε={k}")
            ax.hlines([float(k)] * len(sites), x - width / 2, x + width / 2, color="k", lw=1)
        ax.set_yscale("log")
        ax.set_yticks([float(k) for k in finite])
        ax.set_yticklabels(finite)
        ax.minorticks_off()
        ax.set_xticks(np.arange(len(sites)))
        ax.set_xticklabels(sites)
        ax.set_ylabel(f"ε spent (δ = {study.config.study.delta:g}); tick = budget")
        ax.set_title(ds)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("Privacy spent per site (one bank fit serves every private method)",
                 fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


# -- text ---------------------------------------------------------------------------------
def _describe_missingness(study: Study) -> str:
    m = study.config.missingness
    cols = f" in columns {', '.join(m.columns)}" if m.columns else ""
    if m.mechanism == "one_attribute":
        return (f"the IIM paper's protocol: at each site, {m.rate:.0%} of the complete rows "
                f"each lose one attribute chosen at random{cols}")
    if m.mechanism == "mcar":
        return (f"MCAR (missing completely at random): each observed cell{cols or ''} is "
                f"hidden with probability {m.rate:.0%}, independently of everything")
    if m.mechanism == "mar":
        return (f"MAR (missing at random): a row's cells{cols or ' (all but the driver)'} are "
                f"hidden with a probability that rises (logistic, slope {m.strength:g} per "
                f"std) with its value of `{m.driver}`, which is always observed; "
                f"{m.rate:.0%} of those cells on average")
    return (f"MNAR (missing not at random, self-masking): each cell{cols or ''} is hidden with "
            f"a probability that rises (logistic, slope {m.strength:g} per std) with its own "
            f"value -- large values go missing more often; {m.rate:.0%} per column on "
            "average. No method sees why a value is missing, so all of them are biased "
            "toward the observed (smaller) values")


def _describe_partition(study: Study, i: int) -> str:
    ds = study.config.datasets[i]
    p = ds.partition
    if p.kind == "natural":
        return ("natural: one CSV file per site" if p.column is None
                else f"natural: one site per value of `{p.column}`")
    if p.kind == "iid":
        return f"IID: rows shuffled (seed {p.seed_offset} + seed) and cut into {p.sites} sites"
    if p.kind == "size_skew":
        return ("size skew: rows shuffled and cut into shares "
                + ", ".join(f"{s:g}" for s in (p.sizes or [])))
    if p.kind == "sorted":
        return (f"feature skew: rows sorted by `{p.column}` and cut into {p.sites} "
                "contiguous blocks")
    return (f"Dirichlet skew on `{p.column}` (α = {p.alpha:g}, {p.bins} bins): each class "
            f"spread over {p.sites} sites by Dirichlet proportions")


def _source(study: Study, i: int) -> str:
    ds = study.config.datasets[i]
    if ds.builtin:
        return f"built-in `{ds.builtin}` (scikit-learn)"
    s = f"`{ds.path}`"
    if ds.files:
        s += " (" + ", ".join(ds.files) + ")"
    return s


def _highlights(summary: dict[str, Any], study: Study, ds: str) -> list[str]:
    out = []
    cells = summary.get(ds, {})

    def np_val(m: str) -> float | None:
        c = cells.get(m, {}).get(NP)
        return None if c is None else c["nrmse_mean"]

    public = [(m, np_val(m)) for m in cells if m not in PRIVATE_METHODS]
    public = [(m, v) for m, v in public if v is not None]
    if public:
        best = min(public, key=lambda mv: mv[1])
        out.append(f"Best method without privacy: **{best[0]}** ({best[1]:.3f}) — "
                   f"{METHOD_INFO[best[0]][1].lower()}.")
    loc = np_val("local")
    if loc is not None:
        out.append(f"Each site alone (`local`): {loc:.3f}.")
    ek = [k for k in _eps_keys(study)]
    for m in study.private_methods:
        c = cells.get(m, {})
        ks = [k for k in ek if k in c]
        if not ks:
            continue
        seq = ", ".join(f"{c[k]['nrmse_mean']:.3f} at ε={_eps_label(k)}" for k in ks)
        line = f"`{m}`: {seq}."
        if loc is not None and m in ("hybrid", "federated"):
            gain = {k: loc - c[k]["nrmse_mean"] for k in ks}
            better = [k for k in ks if gain[k] > 0]
            sds = [x for x in [cells["local"][NP]["nrmse_sd"]] + [c[k]["nrmse_sd"] for k in ks]
                   if x is not None]
            sd_txt = f"seed sd ≈ {np.mean(sds):.3f}" if sds else "one seed"
            if better:
                lo, hi = min(gain[k] for k in better), max(gain[k] for k in better)
                where = "every ε" if len(better) == len(ks) else \
                    f"ε ∈ {{{', '.join(_eps_label(k) for k in better)}}} only"
                line += f" Lower than `local` at {where} (by {lo:.3f}–{hi:.3f}; {sd_txt})."
            else:
                line += f" Not lower than `local` at any ε ({sd_txt})."
        out.append(line)
    return out


def render_markdown(run: StudyRun, summary: dict[str, Any], plots: dict[str, str | None]
                    ) -> str:
    study = run.study
    s = study.config.study
    title = s.title or f"Study {s.name}"
    L: list[str] = [f"# {title}", ""]
    if s.description.strip():
        L += [s.description.strip(), ""]
    L += [f"Generated {run.started} by `fediim study` from `{study.source}`. "
          f"{run.n_cells} result cells; {run.n_computed} computed in this run, "
          f"{run.n_cached} reused from the cache; wall time {run.wall_s:.1f} s.", ""]
    if run.failures:
        L += [f"**{len(run.failures)} task(s) failed** (see *Failures* below); their cells "
              "are missing from the tables.", ""]

    L += ["## What was run", ""]
    L += ["| dataset | source | sites (rows) | partition |", "|---|---|---|---|"]
    for i, ds in enumerate(study.config.datasets):
        rec = next((r for r in run.records if r["dataset"] == ds.name), None)
        sites = "" if rec is None else ", ".join(
            f"{k} ({v})" for k, v in rec["n_rows_site"].items())
        L.append(f"| {ds.name} | {_source(study, i)} | {sites} | "
                 f"{_describe_partition(study, i)} |")
    L += ["", f"- **Hidden cells (ground truth):** {_describe_missingness(study)}. Real gaps "
          "in the data stay missing and are not scored. Each seed draws new hidden cells "
          "(and a new split, for random partitions).",
          f"- **Seeds:** {', '.join(map(str, s.seeds))}. **k** (neighbours voting) = {s.k}."]
    if study.private_methods:
        grid = ", ".join(_eps_label(eps_key(e) or "") for e in s.epsilons)
        L.append(f"- **Privacy budgets:** ε ∈ {{{grid}}} "
                 f"per site, δ = {s.delta:g}; ε = ∞ means exact statistics (no noise, no "
                 "privacy). The private methods are all read from one model bank per "
                 "(dataset, seed, ε), so each site pays its budget once for all of them.")
    L += ["", "| method | what it is | what leaves a site |", "|---|---|---|"]
    for m in s.methods:
        what, shares = METHOD_INFO[m]
        L.append(f"| `{m}` | {what.replace('(k)', f'(k={s.k})')} | {shares} |")

    L += ["", "## How to read the numbers", "",
          "**NRMSE** = root mean square error over the hidden cells, each error divided by "
          "its column's standard deviation (over the dataset's complete rows). 0 is perfect. "
          "**About 1 is as bad as filling in the column mean**; above 1 is worse than that. "
          "Each entry is the mean ± standard deviation over the seeds; differences smaller "
          "than the ± are not reliable. \"no DP\" marks methods without a privacy budget "
          "(they either share nothing or share everything).", ""]

    L += ["## Results", ""]
    for ds in summary:
        L += [f"### {ds}", "", table_text(summary, study, ds, markdown=True), ""]
        n_masked = [c["n_masked_mean"] for m in summary[ds].values() for c in m.values()]
        if n_masked:
            L += [f"NRMSE pooled over all sites, ≈{np.mean(n_masked):.0f} hidden cells per "
                  "seed.", ""]
        L += [f"- {h}" for h in _highlights(summary, study, ds)]
        L.append("")

    L += ["## Plots", ""]
    if plots.get("_error"):
        L += [f"Plots were not drawn: {plots['_error']}", ""]
    else:
        captions = {
            "nrmse": "NRMSE against each site's ε. Lines: private methods (mean over seeds, "
                     "shaded min–max, dots = single seeds). Dashed: methods without a budget. "
                     "Dotted grey at 1: the column mean's level.",
            "sites": "Error at each site (private methods at ε = "
                     f"{_eps_label(eps_key(study.report_epsilon) or '')}), mean ± sd over "
                     "seeds. Few hidden cells per site make these noisier than the pooled "
                     "numbers.",
            "privacy": "ε each site actually spent (bars) against its budget (black ticks). "
                       "Spending can fall short of the budget: the private partition stops "
                       "splitting early and its unused share is never spent.",
        }
        for k in ("nrmse", "sites", "privacy"):
            if plots.get(k):
                L += [f"![{k}]({plots[k]})", "", captions[k], ""]

    if study.private_methods:
        L += ["## Privacy spent", "",
              "The privacy unit is one record at one site: whatever a site sends changes "
              "by at most a bounded amount when one of its records is added or removed, and "
              "calibrated Gaussian noise hides that change. Each site's spend is kept in "
              "ρ-zCDP by its own ledger and shown here as (ε, δ). `local` and the `no DP` "
              "baselines spend nothing because `local` sends nothing; the pooled baselines "
              "and `centralized` are not private at all. At ε = ∞ nothing is spent because "
              "nothing is protected.", ""]
        for ds in summary:
            head, rows = privacy_rows(summary, study, ds)
            if not rows:
                continue
            L += [f"**{ds}** (ε spent of the budget, δ = {s.delta:g}):", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            L += ["| " + " | ".join(r) + " |" for r in rows]
            L.append("")

    L += ["## Per site", ""]
    rep = eps_key(study.report_epsilon) if study.private_methods else None
    for ds, meths in summary.items():
        sites = list(next(iter(next(iter(meths.values())).values()))["nrmse_site"])
        head = ["method"] + sites
        L += [f"**{ds}**" + (f" (private methods at ε = {_eps_label(rep)})" if rep else "")
              + ":", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m, cells in meths.items():
            c = cells.get(rep) if m in PRIVATE_METHODS else cells.get(NP)
            if c is None:
                continue
            L.append(f"| {m} | " + " | ".join(
                _fmt(c["nrmse_site"][x]["mean"]) for x in sites) + " |")
        L.append("")

    if run.failures:
        L += ["## Failures", ""]
        for f in run.failures:
            L += [f"- `{f['task']}`: {f['error'].splitlines()[0]}"]
        L += ["", "Rerun the same command after fixing the cause: finished cells are cached "
              "and only the failed ones are computed.", ""]

    L += ["## Files and reproduction", "",
          "- `results.json`: the configuration, every cell (per seed, per site, privacy "
          "spent, timing) and the summary; `results.csv`: the same cells, one row per "
          "(cell, site) plus a row `site = ALL` for the pooled value.",
          f"- cache: `{run.cache_dir}` (one small JSON file per cell; delete it to recompute "
          "everything).",
          f"- reproduce: `fediim study {study.source}` (code fingerprint "
          f"`{run.code_fp[:12]}`; a code change invalidates the cache).", ""]
    return "\n".join(L)


# -- files --------------------------------------------------------------------------------
def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float | np.floating):
        f = float(obj)
        return f if math.isfinite(f) else ("inf" if f > 0 else "-inf" if f < 0 else None)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


CSV_FIELDS = ("dataset", "seed", "method", "epsilon", "private", "site", "n_rows", "n_masked",
              "nrmse", "epsilon_spent", "rho_spent", "rho_budget", "bank_cells", "time_s")


def _csv(records: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)

    def num(x: float | None) -> str:
        return "" if x is None else f"{x:.6g}"

    for r in records:
        base = [r["dataset"], r["seed"], r["method"], r["epsilon"] or "", int(r["private"])]
        w.writerow([*base, "ALL", sum(r["n_rows_site"].values()), r["n_masked"],
                    num(r["nrmse"]), "", "", "", "", num(r["time_s"])])
        for s in r["sites"]:
            p = (r.get("privacy_site") or {}).get(s) or {}
            w.writerow([*base, s, r["n_rows_site"][s], r["n_masked_site"][s],
                        num(r["nrmse_site"][s]), num(p.get("epsilon_spent")),
                        num(p.get("rho_spent")), num(p.get("rho_budget")),
                        (r.get("bank_cells_site") or {}).get(s, ""), ""])
    return buf.getvalue()


def write_outputs(run: StudyRun) -> dict[str, Path]:
    """Write results.json, results.csv, the plots and report.md (last) under run.out_dir."""

    out = run.out_dir
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(run.records)
    files: dict[str, Path] = {}
    payload = {
        "study": run.study.name, "source": run.study.source, "generated": run.started,
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config": run.study.config.model_dump(), "base_dir": str(run.study.base_dir),
        "code_fingerprint": run.code_fp, "machine": machine_info(),
        "cells": {"total": run.n_cells, "cached": run.n_cached, "computed": run.n_computed,
                  "failed": sum(len(f["methods"]) for f in run.failures)},
        "wall_s": run.wall_s, "summary": summary, "records": run.records,
        "failures": run.failures,
    }
    files["json"] = out / "results.json"
    atomic_write_text(files["json"], json.dumps(_json_safe(payload), indent=1,
                                                allow_nan=False) + "\n")
    files["csv"] = out / "results.csv"
    atomic_write_text(files["csv"], _csv(run.records))

    plots: dict[str, str | None] = {}
    if summary:
        if _pyplot() is None:
            plots["_error"] = ("matplotlib is not installed (`pip install 'fediim[dev]'` or "
                               "`pip install matplotlib`)")
        else:
            for k, name, fn in (("nrmse", "nrmse_vs_epsilon.png", plot_nrmse),
                                ("sites", "per_site.png", plot_sites),
                                ("privacy", "privacy_spent.png", plot_privacy)):
                drawn = fn(summary, run.study, out / name)
                if drawn is not False:
                    plots[k] = name
                    files[k] = out / name
    files["report"] = out / "report.md"
    atomic_write_text(files["report"], render_markdown(run, summary, plots))
    return files
