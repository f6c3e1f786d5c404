"""A study's outputs: results JSON and CSV, the plots, and ``report.md``.

Every file is written atomically (``fediim.io``); the report is written last. Plots need
matplotlib (``pip install 'fediim[dev]'``); without it the report says so and keeps its
tables.
"""

from __future__ import annotations

import csv
import datetime
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fediim.io.atomic import atomic_write_text
from fediim.io.json_results import write_results
from simulations.config import PRIVATE_METHODS, MissingnessConfig, Study, eps_key
from simulations.downstream import downstream_markdown, summarise_downstream
from simulations.plots import plot_nrmse, plot_privacy, plot_sites, pyplot
from simulations.provenance import StudyRun, machine_info
from simulations.small_site import (
    SMALL_SITE_TITLE,
    small_site_markdown,
    small_site_panels,
    small_site_results,
)
from simulations.summary import NP, paired_differences, site_gains, summarise
from simulations.tables import (
    eps_label,
    fmt,
    markdown_table,
    paired_rows,
    privacy_rows,
    study_eps_keys,
    table_text,
)

__all__ = ["CSV_FIELDS", "METHOD_INFO", "render_markdown", "write_outputs"]

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

_PLOT_CAPTIONS = {
    "nrmse": "NRMSE against each site's ε. Lines: private methods (mean over seeds, shaded "
             "min–max, dots = single seeds). Dashed: methods without a budget. Dotted grey "
             "at 1: the column mean's level.",
    "sites": "Error at each site (private methods at ε = {rep}), mean ± sd over seeds. Few "
             "hidden cells per site make these noisier than the pooled numbers.",
    "privacy": "ε each site actually spent (bars) against its budget (black ticks). "
               "Spending can fall short of the budget: the private partition stops "
               "splitting early and its unused share is never spent.",
    "small_site": "The smallest site of each dataset alone (and each column it never "
                  "measures): NRMSE against its ε for the site alone (`local`), the "
                  "pooled ceiling (`centralized`), the bank alone (`federated`) and the "
                  "blend (`hybrid`).",
}


# -- text ---------------------------------------------------------------------------------
def _describe_missingness(study: Study) -> str:
    """The missingness mechanism in words, and each site's own where it has one."""
    m = study.config.missingness
    own = "".join(f"; at site `{site}`, its own: {_describe_mechanism(cfg)}"
                  for site, cfg in m.sites.items())
    return _describe_mechanism(m) + own


def _describe_mechanism(m: MissingnessConfig) -> str:
    """One missingness section's mechanism in words."""
    cols = f" in columns {', '.join(m.columns)}" if m.columns else ""
    if m.mechanism == "one_attribute":
        per_site = "".join(f"; at site `{s}`, {r:.0%}" for s, r in m.site_rates.items())
        return (f"the IIM paper's protocol: at each site, {m.rate:.0%} of the complete rows "
                f"each lose one attribute chosen at random{cols}{per_site}")
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
    """Dataset ``i``'s split into sites in words."""
    ds = study.config.datasets[i]
    p = ds.partition
    if p.kind == "natural":
        return ("natural: one CSV file per site" if p.column is None
                else f"natural: one site per value of `{p.column}`")
    if p.kind == "iid":
        return f"IID: rows shuffled (seed {p.seed_offset} + seed) and cut into {p.sites} sites"
    if p.kind == "size_skew" and p.rows is not None:
        return ("size skew: rows shuffled and dealt into sites of exactly "
                + ", ".join(map(str, p.rows)) + " rows")
    if p.kind == "size_skew":
        return ("size skew: rows shuffled and cut into shares "
                + ", ".join(f"{s:g}" for s in (p.sizes or [])))
    if p.kind == "sorted":
        return (f"feature skew: rows sorted by `{p.column}` and cut into {p.sites} "
                "contiguous blocks")
    return (f"Dirichlet skew on `{p.column}` (α = {p.alpha:g}, {p.bins} bins): each class "
            f"spread over {p.sites} sites by Dirichlet proportions")


def _source(study: Study, i: int) -> str:
    """Where dataset ``i`` comes from."""
    ds = study.config.datasets[i]
    if ds.builtin:
        return f"built-in `{ds.builtin}` (scikit-learn)"
    s = f"`{ds.path}`"
    if ds.files:
        s += " (" + ", ".join(ds.files) + ")"
    return s


def _highlights(summary: dict[str, Any], study: Study, ds: str) -> list[str]:
    """A few sentences on one dataset: the best non-private method, local, each private
    method across epsilons."""
    out = []
    cells = summary.get(ds, {})
    public = [(m, c[NP]["nrmse_mean"]) for m, c in cells.items()
              if m not in PRIVATE_METHODS and NP in c]
    if public:
        best = min(public, key=lambda mv: mv[1])
        out.append(f"Best method without privacy: **{best[0]}** ({best[1]:.3f}) — "
                   f"{METHOD_INFO[best[0]][1].lower()}.")
    local = cells.get("local", {}).get(NP)
    if local is not None:
        out.append(f"Each site alone (`local`): {local['nrmse_mean']:.3f}.")
    for m in study.private_methods:
        c = cells.get(m, {})
        ks = [k for k in study_eps_keys(study) if k in c]
        if not ks:
            continue
        seq = ", ".join(f"{c[k]['nrmse_mean']:.3f} at ε={eps_label(k)}" for k in ks)
        line = f"`{m}`: {seq}."
        if local is not None and m in ("hybrid", "federated"):
            line += " " + _against_local(local, [c[k] for k in ks], ks)
        out.append(line)
    return out


def _against_local(local: dict[str, Any], cells: Sequence[dict[str, Any]],
                   keys: Sequence[str]) -> str:
    """Where a private method's mean is below local's, by how much, against the seed sd."""
    gain = {k: local["nrmse_mean"] - c["nrmse_mean"] for k, c in zip(keys, cells, strict=True)}
    better = [k for k in keys if gain[k] > 0]
    sds = [x for x in [local["nrmse_sd"]] + [c["nrmse_sd"] for c in cells] if x is not None]
    sd_txt = f"seed sd ≈ {np.mean(sds):.3f}" if sds else "one seed"
    if not better:
        return f"Not lower than `local` at any ε ({sd_txt})."
    lo, hi = min(gain[k] for k in better), max(gain[k] for k in better)
    where = "every ε" if len(better) == len(keys) else \
        f"ε ∈ {{{', '.join(eps_label(k) for k in better)}}} only"
    return f"Lower than `local` at {where} (by {lo:.3f}–{hi:.3f}; {sd_txt})."


# -- report.md ----------------------------------------------------------------------------
def _intro(run: StudyRun) -> list[str]:
    s = run.study.config.study
    lines = [f"# {s.title or f'Study {s.name}'}", ""]
    if s.description.strip():
        lines += [s.description.strip(), ""]
    lines += [f"Generated {run.started} by `fediim study` from `{run.study.source}`. "
              f"{run.n_cells} result cells; {run.n_computed} computed in this run, "
              f"{run.n_cached} reused from the cache; wall time {run.wall_s:.1f} s.", ""]
    if run.failures:
        lines += [f"**{len(run.failures)} task(s) failed** (see *Failures* below); their "
                  "cells are missing from the tables.", ""]
    return lines


def _what_was_run(run: StudyRun) -> list[str]:
    study = run.study
    s = study.config.study
    rows = []
    for i, ds in enumerate(study.config.datasets):
        rec = next((r for r in run.records if r["dataset"] == ds.name), None)
        sites = "" if rec is None else ", ".join(
            f"{k} ({v})" for k, v in rec["n_rows_site"].items())
        rows.append([ds.name, _source(study, i), sites, _describe_partition(study, i)])
    lines = ["## What was run", "",
             markdown_table(["dataset", "source", "sites (rows)", "partition"], rows), "",
             f"- **Hidden cells (ground truth):** {_describe_missingness(study)}. Real gaps "
             "in the data stay missing and are not scored. Each seed draws new hidden cells "
             "(and a new split, for random partitions).",
             f"- **Seeds:** {', '.join(map(str, s.seeds))}. **k** (neighbours voting) = {s.k}."]
    if study.private_methods:
        grid = ", ".join(eps_label(k) for k in study_eps_keys(study))
        lines.append(f"- **Privacy budgets:** ε ∈ {{{grid}}} per site, δ = {s.delta:g}; "
                     "ε = ∞ means exact statistics (no noise, no privacy). The private "
                     "methods are all read from one model bank per (dataset, seed, ε), so "
                     "each site pays its budget once for all of them.")
    lines += _never_measured(study)
    methods = [[f"`{m}`", METHOD_INFO[m][0].replace("(k)", f"(k={s.k})"), METHOD_INFO[m][1]]
               for m in s.methods]
    return lines + ["", markdown_table(["method", "what it is", "what leaves a site"],
                                       methods), ""]


def _never_measured(study: Study) -> list[str]:
    """A bullet per dataset with ``[datasets.absent]``."""
    return [f"- **Never measured ({ds.name}):** "
            + "; ".join(f"site `{site}` never measures {', '.join(f'`{c}`' for c in cols)}"
                        for site, cols in ds.absent.items())
            + ". Those columns are hidden there before any other masking (the site's other "
              "rows may still lose an attribute it does measure); their true values are "
              "scored on their own, not in the pooled or per-site NRMSE (see *The smallest "
              "site*)." for ds in study.config.datasets if ds.absent]


_HOW_TO_READ = [
    "## How to read the numbers", "",
    "**NRMSE** = root mean square error over the hidden cells, each error divided by its "
    "column's standard deviation (over the dataset's complete rows). 0 is perfect. **About "
    "1 is as bad as filling in the column mean**; above 1 is worse than that. Each entry is "
    "the mean ± standard deviation over the seeds; differences smaller than the ± are not "
    "reliable. \"no DP\" marks methods without a privacy budget (they either share nothing "
    "or share everything).", ""]


def _results(summary: dict[str, Any], paired: dict[str, Any], study: Study) -> list[str]:
    lines = ["## Results", ""]
    for ds in summary:
        lines += [f"### {ds}", "", table_text(summary, study, ds, markdown=True), ""]
        n_masked = [c["n_masked_mean"] for m in summary[ds].values() for c in m.values()]
        if n_masked:
            lines += [f"NRMSE pooled over all sites, ≈{np.mean(n_masked):.0f} hidden cells "
                      "per seed.", ""]
        lines += [f"- {h}" for h in _highlights(summary, study, ds)] + [""]
        rows = paired_rows(paired, ds, study_eps_keys(study))
        if rows:
            head = ["method − local"] + [f"ε={eps_label(k)}" for k in study_eps_keys(study)]
            lines += ["Paired by seed (the same hidden cells): NRMSE of the method minus "
                      "`local`, mean ± standard error over seeds. Negative: the federation "
                      "helps.", "", markdown_table(head, rows), ""]
    return lines


def _small_site(small: dict[str, Any], study: Study) -> list[str]:
    body = small_site_markdown(small, study_eps_keys(study))
    if not body:
        return []
    return ["## The smallest site", "",
            "Pooled numbers are dominated by the large sites. Here each dataset's smallest "
            "site alone: its NRMSE (mean ± sd over seeds) with its own data only (`local`), "
            "with every site's raw rows pooled (`centralized`, not private), with the "
            "private bank only (`federated`) and with the blend (`hybrid`).", "", *body]


def _plots(plots: dict[str, str | None], study: Study) -> list[str]:
    lines = ["## Plots", ""]
    if plots.get("_error"):
        return lines + [f"Plots were not drawn: {plots['_error']}", ""]
    rep = eps_label(eps_key(study.report_epsilon) or "")
    for k in ("nrmse", "small_site", "sites", "privacy"):
        if plots.get(k):
            lines += [f"![{k}]({plots[k]})", "", _PLOT_CAPTIONS[k].format(rep=rep), ""]
    return lines


def _privacy_spent(summary: dict[str, Any], study: Study) -> list[str]:
    if not study.private_methods:
        return []
    lines = ["## Privacy spent", "",
             "The privacy unit is one record at one site: whatever a site sends changes by at "
             "most a bounded amount when one of its records is added or removed, and "
             "calibrated Gaussian noise hides that change. Each site's spend is kept in "
             "ρ-zCDP by its own ledger and shown here as (ε, δ). `local` and the `no DP` "
             "baselines spend nothing because `local` sends nothing; the pooled baselines "
             "and `centralized` are not private at all. At ε = ∞ nothing is spent because "
             "nothing is protected.", "",
             "**Seeded noise (insecure, simulation only).** A study draws every site's noise "
             "from numpy generators seeded by the study's seeds, so that each cell can be "
             "reproduced; whoever knows a seed can subtract the noise. The ε below is what "
             "the same release would guarantee with OpenDP's sampler, as deployments use "
             "(sites refuse seeded noise unless their TOML says `insecure_seeded_noise = "
             "true`).", ""]
    for ds in summary:
        head, rows = privacy_rows(summary, study, ds)
        if rows:
            lines += [f"**{ds}** (ε spent of the budget, δ = {study.config.study.delta:g}):",
                      "", markdown_table(head, rows), ""]
    return lines


def _per_site(summary: dict[str, Any], study: Study) -> list[str]:
    lines = ["## Per site", ""]
    rep = eps_key(study.report_epsilon) if study.private_methods else None
    for ds, meths in summary.items():
        sites = list(next(iter(next(iter(meths.values())).values()))["nrmse_site"])
        rows = []
        for m, cells in meths.items():
            c = cells.get(rep) if m in PRIVATE_METHODS else cells.get(NP)
            if c is not None:
                rows.append([m] + [fmt(c["nrmse_site"][x]["mean"]) for x in sites])
        title = f"**{ds}**" + (f" (private methods at ε = {eps_label(rep)})" if rep else "")
        lines += [title + ":", "", markdown_table(["method", *sites], rows), ""]
    return lines


def _gains(run: StudyRun) -> list[str]:
    """What joining gains each site at the report's epsilon (hybrid against alone)."""
    study = run.study
    if "hybrid" not in study.config.study.methods or "local" not in study.config.study.methods:
        return []
    rep = eps_key(study.report_epsilon)
    lines = ["## What joining gains each site", "",
             f"Each site's NRMSE alone (`local`) and in the federation (`hybrid`, ε = "
             f"{eps_label(rep)}), and the difference paired by seed (mean ± standard error; "
             "negative: joining helps).", ""]
    for ds, sites in site_gains(run.records, rep).items():
        rows = [[site, fmt(g["local"]), fmt(g["joined"]),
                 f"{g['mean']:+.3f} ± {g['se']:.3f}",
                 f"{100 * g['mean'] / g['local']:+.1f}%" if g["local"] else ""]
                for site, g in sites.items()]
        lines += [f"**{ds}**:", "", markdown_table(
            ["site", "alone", "joined", "joined − alone", "relative"], rows), ""]
    return lines


def _failures(run: StudyRun) -> list[str]:
    if not run.failures:
        return []
    return (["## Failures", ""]
            + [f"- `{f['task']}`: {f['error'].splitlines()[0]}" for f in run.failures]
            + ["", "Rerun the same command after fixing the cause: finished cells are cached "
               "and only the failed ones are computed.", ""])


def _files(run: StudyRun) -> list[str]:
    return ["## Files and reproduction", "",
            "- `results.json`: the configuration, every cell (per seed, per site, privacy "
            "spent, timing), the summary and the paired comparisons; `results.csv`: the same "
            "cells, one row per (cell, site) plus a row `site = ALL` for the pooled value.",
            f"- cache: `{run.cache_dir}` (one small JSON file per cell; delete it to "
            "recompute everything).",
            f"- reproduce: `fediim study {run.study.source}` (code fingerprint "
            f"`{run.code_fp[:12]}`; a code change invalidates the cache).", ""]


def _categorical(records: Sequence[dict[str, Any]]) -> list[str]:
    """Accuracy on the hidden cells of binary and categorical columns (studies declaring
    ``[datasets.levels]``), pooled over seeds (each seed weighted by its hidden cells)
    and per site; nothing for a study without coded columns."""
    hits: dict[tuple[str, str], dict[str, list[float]]] = {}
    for rec in records:
        if rec.get("accuracy_site") is None:
            continue
        label = rec["method"] + ("" if rec["epsilon"] is None else
                                 f" (ε = {eps_label(rec['epsilon'])})")
        tally = hits.setdefault((rec["dataset"], label), {})
        for site, accuracy in rec["accuracy_site"].items():
            n = rec["n_coded_masked_site"][site]
            pair = tally.setdefault(site, [0.0, 0.0])
            pair[0] += (accuracy or 0.0) * n
            pair[1] += n
    if not hits:
        return []
    lines = ["## Categorical accuracy", "",
             "Share of the hidden binary and categorical cells imputed with their true "
             "level, over all seeds (cells in brackets).", ""]
    for ds in dict.fromkeys(ds for ds, _ in hits):
        rows, sites = [], None
        for (name, label), tally in hits.items():
            if name != ds:
                continue
            sites = list(tally)
            correct, total = (sum(pair[i] for pair in tally.values()) for i in (0, 1))
            rows.append([label, _share(correct, total)] + [_share(*tally[x]) for x in sites])
        lines += [f"**{ds}**:", "", markdown_table(["method", "pooled", *(sites or [])], rows),
                  ""]
    return lines


def _share(correct: float, total: float) -> str:
    return f"{correct / total:.3f} ({total:.0f})" if total else "—"


def render_markdown(run: StudyRun, summary: dict[str, Any], plots: dict[str, str | None],
                    paired: dict[str, Any] | None = None,
                    small: dict[str, Any] | None = None) -> str:
    """``report.md``: what was run, how to read it, results, the smallest site, plots,
    privacy, per site."""
    study = run.study
    paired = paired if paired is not None else paired_differences(run.records)
    small = small if small is not None else small_site_results(run.records)
    sections = [_intro(run), _what_was_run(run), _HOW_TO_READ,
                _results(summary, paired, study), _small_site(small, study),
                _plots(plots, study),
                downstream_markdown(summarise_downstream(run.records), study),
                _privacy_spent(summary, study), _per_site(summary, study),
                _categorical(run.records), _gains(run),
                _failures(run),
                _files(run)]
    return "\n".join(line for section in sections for line in section)


# -- files --------------------------------------------------------------------------------
CSV_FIELDS = ("dataset", "seed", "method", "epsilon", "private", "site", "n_rows", "n_masked",
              "nrmse", "epsilon_spent", "rho_spent", "rho_budget", "bank_cells", "time_s")


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.6g}"


def _csv(records: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for r in records:
        base = [r["dataset"], r["seed"], r["method"], r["epsilon"] or "", int(r["private"])]
        w.writerow([*base, "ALL", sum(r["n_rows_site"].values()), r["n_masked"],
                    _num(r["nrmse"]), "", "", "", "", _num(r["time_s"])])
        for s in r["sites"]:
            p = (r.get("privacy_site") or {}).get(s) or {}
            w.writerow([*base, s, r["n_rows_site"][s], r["n_masked_site"][s],
                        _num(r["nrmse_site"][s]), _num(p.get("epsilon_spent")),
                        _num(p.get("rho_spent")), _num(p.get("rho_budget")),
                        (r.get("bank_cells_site") or {}).get(s, ""), ""])
    return buf.getvalue()


def _draw_plots(summary: dict[str, Any], small: dict[str, Any], study: Study, out: Path
                ) -> dict[str, str | None]:
    """The plots under ``out``: name per drawn plot, or ``_error`` without matplotlib."""
    if not summary:
        return {}
    if pyplot() is None:
        return {"_error": "matplotlib is not installed (`pip install 'fediim[dev]'` or "
                          "`pip install matplotlib`)"}
    plots: dict[str, str | None] = {}
    plot_nrmse(summary, study_eps_keys(study), study.config.study.delta,
               out / "nrmse_vs_epsilon.png")
    plots["nrmse"] = "nrmse_vs_epsilon.png"
    panels = small_site_panels(small)
    if panels:
        plot_nrmse(panels, study_eps_keys(study), study.config.study.delta,
                   out / "small_site.png", title=SMALL_SITE_TITLE)
        plots["small_site"] = "small_site.png"
    plot_sites(summary, study, out / "per_site.png")
    plots["sites"] = "per_site.png"
    if plot_privacy(summary, study, out / "privacy_spent.png"):
        plots["privacy"] = "privacy_spent.png"
    return plots


def write_outputs(run: StudyRun) -> dict[str, Path]:
    """Write results.json, results.csv, the plots and report.md (last) under run.out_dir."""
    out = run.out_dir
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(run.records)
    paired = paired_differences(run.records)
    small = small_site_results(run.records)
    payload = {
        "study": run.study.name, "source": run.study.source, "generated": run.started,
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config": run.study.config.model_dump(), "base_dir": str(run.study.base_dir),
        "code_fingerprint": run.code_fp, "machine": machine_info(),
        "cells": {"total": run.n_cells, "cached": run.n_cached, "computed": run.n_computed,
                  "failed": sum(len(f["methods"]) for f in run.failures)},
        "wall_s": run.wall_s, "summary": summary, "paired_vs_local": paired,
        "small_site": small, "records": run.records, "failures": run.failures,
    }
    if run.study.config.downstream is not None:
        payload["downstream"] = summarise_downstream(run.records)
    files = {"json": out / "results.json", "csv": out / "results.csv"}
    write_results(files["json"], payload)
    atomic_write_text(files["csv"], _csv(run.records))
    plots = _draw_plots(summary, small, run.study, out)
    files.update({k: out / str(name) for k, name in plots.items() if k != "_error"})
    files["report"] = out / "report.md"
    atomic_write_text(files["report"], render_markdown(run, summary, plots, paired, small))
    return files
