"""The smallest site of each dataset on its own: does joining the federation pay for it?

Pooled NRMSE is dominated by the large sites; a 150-row site among sites of 3,000 is where
the federation should matter most. For each dataset, the smallest site by rows (the first
on ties) is rescored from the per-seed records: its own NRMSE (``nrmse_site``), its
NRMSE on each column it never measures (``nrmse_absent``, see
:func:`simulations.methods.score`), and two paired comparisons at that site --
``hybrid − local`` and ``hybrid − min(local, federated)`` (negative or zero: the blend
does at least as well as the better of the site alone and the bank alone).

:func:`small_site_results` computes it (it goes to ``results.json`` as ``small_site``);
:func:`small_site_markdown` and :func:`small_site_panels` render it for the report, the
privacy-utility benchmark and ``benchmarks/skewed_quick.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from simulations.summary import NP, paired_against, summarise
from simulations.tables import eps_label, markdown_table, paired_rows, result_rows

__all__ = ["COMPARISONS", "SMALL_SITE_METHODS", "SMALL_SITE_TITLE", "site_records",
           "small_site_markdown", "small_site_panels", "small_site_results", "smallest_site"]

#: The methods shown for the small site: alone, pooled (the ceiling), bank only, blend.
SMALL_SITE_METHODS: tuple[str, ...] = ("local", "centralized", "federated", "hybrid")
#: The title of the small-site plot.
SMALL_SITE_TITLE = ("The smallest site alone: NRMSE vs each site's privacy budget\n(private: "
                    "mean over seeds, shaded min–max, dots = seeds; dashed: no budget)")
#: Paired comparisons at the small site: label -> (method, baselines whose minimum it is
#: compared with, per seed).
COMPARISONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "hybrid − local": ("hybrid", ("local",)),
    "hybrid − min(local, federated)": ("hybrid", ("local", "federated")),
}


def smallest_site(records: Sequence[dict[str, Any]], dataset: str) -> str | None:
    """The dataset's site with the fewest rows (the first on ties), None without records."""
    rec = next((r for r in records if r["dataset"] == dataset), None)
    if rec is None:
        return None
    rows = rec["n_rows_site"]
    return min(rec["sites"], key=lambda s: rows[s])


def site_records(records: Sequence[dict[str, Any]], dataset: str, site: str,
                 column: str | None = None) -> list[dict[str, Any]]:
    """The dataset's records rescored at one site: ``nrmse`` (and ``n_masked``) become the
    site's, or with ``column`` those of that never-measured column at the site. Records
    without a value there (a method that left the cells empty) are left out."""
    out = []
    for r in records:
        if r["dataset"] != dataset:
            continue
        if column is None:
            value, n = r["nrmse_site"].get(site), r["n_masked_site"].get(site)
        else:
            value = r.get("nrmse_absent", {}).get(site, {}).get(column)
            n = r.get("n_absent", {}).get(site, {}).get(column)
        if value is not None:
            out.append({**r, "nrmse": value, "n_masked": n})
    return out


def _absent_columns(records: Sequence[dict[str, Any]], dataset: str, site: str) -> list[str]:
    rec = next(r for r in records if r["dataset"] == dataset)
    return list(rec.get("nrmse_absent", {}).get(site, {}))


def _dataset_results(records: Sequence[dict[str, Any]], dataset: str, site: str
                     ) -> dict[str, Any]:
    """One dataset's small-site numbers (see :func:`small_site_results`)."""
    view = site_records(records, dataset, site)
    rec = next(r for r in records if r["dataset"] == dataset)
    paired = {}
    for label, (method, baselines) in COMPARISONS.items():
        by_eps = paired_against(view, baselines, [method]).get(dataset, {}).get(method)
        if by_eps:
            paired[label] = by_eps
    absent = {}
    for col in _absent_columns(records, dataset, site):
        col_view = site_records(records, dataset, site, col)
        done = {r["method"] for r in col_view}
        absent[col] = {
            "summary": summarise(col_view).get(dataset, {}),
            "unimputed": sorted({r["method"] for r in records if r["dataset"] == dataset}
                                - done),
            "n_cells": rec["n_absent"][site][col]}
    return {"site": site, "n_rows": rec["n_rows_site"][site],
            "n_rows_total": sum(rec["n_rows_site"].values()),
            "summary": summarise(view).get(dataset, {}), "paired": paired, "absent": absent}


def small_site_results(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """dataset -> its smallest site's numbers over seeds.

    ``site``, ``n_rows``, ``n_rows_total``; ``summary``: method -> epsilon key -> the
    statistics of :func:`simulations.summary.summarise` at that site; ``paired``: each of
    :data:`COMPARISONS` -> epsilon key -> mean, se, n_seeds; ``absent``: each column the
    site never measures -> its ``summary`` on those cells, the methods that left them
    empty (``unimputed``) and ``n_cells`` per seed.
    """
    out: dict[str, Any] = {}
    for ds in dict.fromkeys(r["dataset"] for r in records):
        site = smallest_site(records, ds)
        if site is not None:
            out[ds] = _dataset_results(records, ds, site)
    return out


# -- rendering ----------------------------------------------------------------------------
def _methods(summary: dict[str, Any]) -> list[str]:
    return [m for m in SMALL_SITE_METHODS if m in summary]


def _ratio_rows(summary: dict[str, Any], eps_keys: Sequence[str]) -> list[list[str]]:
    """``method ÷ centralized`` per epsilon (ratio of the means over seeds)."""
    cent = summary.get("centralized", {}).get(NP)
    if cent is None or not cent["nrmse_mean"]:
        return []
    rows = []
    for m in ("federated", "hybrid"):
        if m in summary:
            cells = [summary[m].get(k) for k in eps_keys]
            rows.append([f"{m} ÷ centralized", ""] + [
                "" if c is None else f"{c['nrmse_mean'] / cent['nrmse_mean']:.2f}×"
                for c in cells])
    return rows


def _absent_lines(ds: str, site: str, col: str, info: dict[str, Any],
                  eps_keys: Sequence[str]) -> list[str]:
    head = ["method", "no DP"] + [f"ε={eps_label(k)}" for k in eps_keys]
    rows = result_rows({ds: info["summary"]}, ds, _methods(info["summary"]), eps_keys)
    empty = [m for m in info["unimputed"] if m in SMALL_SITE_METHODS]
    note = (f" {', '.join(f'`{m}`' for m in empty)} cannot fill them in (the site alone has "
            "no value of the column to learn from)." if empty else "")
    return [f"Never-measured column `{col}` at `{site}` alone: its {info['n_cells']} true "
            f"values are hidden and scored on their own (not in the table above).{note}", "",
            markdown_table(head, rows + _ratio_rows(info["summary"], eps_keys)), ""]


def small_site_markdown(results: dict[str, Any], eps_keys: Sequence[str],
                        heading: str = "###") -> list[str]:
    """Per dataset: the small site's NRMSE table, its paired comparisons and its
    never-measured columns, as Markdown lines."""
    lines: list[str] = []
    head = ["method", "no DP"] + [f"ε={eps_label(k)}" for k in eps_keys]
    for ds, res in results.items():
        summ, site = res["summary"], res["site"]
        if not _methods(summ):
            continue
        n_cells = [c["n_masked_mean"] for m in _methods(summ) for c in summ[m].values()]
        lines += [f"{heading} {ds}: site `{site}` ({res['n_rows']} of {res['n_rows_total']} "
                  f"rows, ≈{max(n_cells):.0f} hidden cells per seed)", "",
                  markdown_table(head, result_rows({ds: summ}, ds, _methods(summ),
                                                   eps_keys)), ""]
        rows = paired_rows({ds: res["paired"]}, ds, eps_keys)
        if rows:
            lines += [f"Paired by seed at `{site}`, mean ± standard error over seeds "
                      "(negative: hybrid is better; `min(local, federated)` is the better "
                      "of the two on each seed):", "",
                      markdown_table(["comparison", *head[2:]], rows), ""]
        for col, info in res["absent"].items():
            lines += _absent_lines(ds, site, col, info, eps_keys)
    return lines


def small_site_panels(results: dict[str, Any]) -> dict[str, Any]:
    """Plot panels (title -> method -> epsilon key -> statistics) of the small sites and
    their never-measured columns, for :func:`simulations.plots.plot_nrmse`."""
    panels: dict[str, Any] = {}
    for ds, res in results.items():
        keep = _methods(res["summary"])
        if keep:
            panels[f"{ds}: site {res['site']} ({res['n_rows']} rows)"] = {
                m: res["summary"][m] for m in keep}
        for col, info in res["absent"].items():
            if _methods(info["summary"]):
                panels[f"{ds}: site {res['site']}, never-measured {col}"] = {
                    m: info["summary"][m] for m in _methods(info["summary"])}
    return panels

