"""A study's numbers as text tables (Markdown for reports, aligned text for a terminal)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from simulations.config import PRIVATE_METHODS, Study, eps_key
from simulations.summary import NP

__all__ = ["aligned_table", "cell_text", "eps_label", "fmt", "markdown_table", "paired_rows",
           "privacy_rows", "result_rows", "study_eps_keys", "table_text"]


def fmt(x: float | None, digits: int = 3) -> str:
    """A number with ``digits`` decimals; a dash when there is none (None, inf or NaN)."""
    return "—" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def cell_text(c: dict[str, Any] | None, sd: bool = True) -> str:
    """A summary cell as ``mean ± sd`` (sd over seeds, when there are several)."""
    if c is None:
        return ""
    s = fmt(c["nrmse_mean"])
    if sd and c["nrmse_sd"] is not None:
        s += f" ± {c['nrmse_sd']:.3f}"
    return s


def eps_label(k: str) -> str:
    """An epsilon key as shown to a reader (``inf`` as ∞)."""
    return "∞" if k == "inf" else k


def study_eps_keys(study: Study) -> list[str]:
    """The study's epsilon keys in grid order (none without a private method)."""
    return [eps_key(e) or "" for e in study.config.study.epsilons] if study.private_methods \
        else []


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def aligned_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain text columns: the first left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
                     for r in [head, *rows])


def result_rows(summary: dict[str, Any], dataset: str, methods: Sequence[str],
                eps_keys: Sequence[str], sd: bool = True) -> list[list[str]]:
    """Per method: its name, its non-private NRMSE, then its NRMSE at each epsilon."""
    rows = []
    for meth in methods:
        cells = summary.get(dataset, {}).get(meth, {})
        if meth in PRIVATE_METHODS:
            rows.append([meth, ""] + [cell_text(cells.get(k), sd) for k in eps_keys])
        else:
            rows.append([meth, cell_text(cells.get(NP), sd)] + [""] * len(eps_keys))
    return rows


def table_text(summary: dict[str, Any], study: Study, dataset: str, *, markdown: bool,
               sd: bool = True) -> str:
    """Method x epsilon NRMSE table (mean ± sd over seeds) for one dataset."""
    ek = study_eps_keys(study)
    head = ["method", "no DP"] + [f"ε={eps_label(k)}" for k in ek]
    rows = result_rows(summary, dataset, study.config.study.methods, ek, sd)
    return markdown_table(head, rows) if markdown else aligned_table(head, rows)


def paired_rows(paired: dict[str, Any], dataset: str, eps_keys: Sequence[str]
                ) -> list[list[str]]:
    """Per method: its paired difference from the baseline at each epsilon, as
    ``mean ± standard error`` (see :func:`simulations.summary.paired_differences`)."""
    rows = []
    for meth, by_eps in paired.get(dataset, {}).items():
        cells = [by_eps.get(k) for k in eps_keys]
        rows.append([meth] + ["" if c is None else f"{c['mean']:+.3f} ± {c['se']:.3f}"
                              for c in cells])
    return rows


def privacy_rows(summary: dict[str, Any], study: Study, dataset: str
                 ) -> tuple[list[str], list[list[str]]]:
    """Per site: the ε each site spent (of its budget) at each finite ε of the grid."""
    priv = [m for m in study.private_methods if m in summary.get(dataset, {})]
    finite = [k for k in study_eps_keys(study) if k != "inf"]
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
