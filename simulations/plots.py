"""A study's plots: NRMSE against epsilon, per-site error, privacy spent per site.

Each is written atomically as a PNG. They need matplotlib (``pip install 'fediim[dev]'``);
:func:`pyplot` is None without it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fediim.io.atomic import atomic_write_bytes
from simulations.config import PRIVATE_METHODS, Study, eps_key
from simulations.summary import NP
from simulations.tables import eps_label, study_eps_keys

__all__ = ["plot_nrmse", "plot_privacy", "plot_sites", "pyplot"]

_COLORS = {m: c for m, c in zip(
    ("centralized", "local", "federated", "hybrid", "federated_mean", "knn", "mean", "mice",
     "missforest", "knn_local", "mean_local", "mice_local", "missforest_local"),
    ("black", "tab:red", "tab:blue", "tab:green", "tab:gray", "tab:orange", "tab:brown",
     "tab:purple", "tab:olive", "tab:orange", "tab:brown", "tab:purple", "tab:olive"),
    strict=True)}


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or None when matplotlib is not installed."""
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


def _finish(fig: Any, ax_list: Any, title: str, path: Path, plt: Any) -> None:
    for ax in ax_list:
        if ax.get_visible() and ax.has_data():
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _private_line(ax: Any, meth: str, cells: dict[str, Any], xs: dict[str, float]) -> None:
    """A private method: mean over seeds, shaded min–max, one dot per seed."""
    color = _COLORS.get(meth)
    ks = [k for k in xs if k in cells]
    x = [xs[k] for k in ks]
    ax.plot(x, [cells[k]["nrmse_mean"] for k in ks], marker="o", color=color, label=meth)
    ax.fill_between(x, [cells[k]["nrmse_min"] for k in ks],
                    [cells[k]["nrmse_max"] for k in ks], color=color, alpha=0.15, lw=0)
    for k in ks:
        ax.scatter([xs[k]] * len(cells[k]["nrmse_seeds"]), cells[k]["nrmse_seeds"],
                   color=color, s=8, alpha=0.6)


_NRMSE_TITLE = ("NRMSE vs each site's privacy budget\n(private: mean over seeds, shaded "
                "min–max, dots = seeds; dashed: no budget)")


def plot_nrmse(summary: dict[str, Any], eps_keys: Sequence[str], delta: float, path: Path,
               title: str = _NRMSE_TITLE) -> None:
    """NRMSE against each site's epsilon, one panel per key of ``summary`` (a dataset, or
    any panel title: :func:`simulations.small_site.small_site_panels`)."""
    plt = pyplot()
    finite = [float(k) for k in eps_keys if k != "inf"]
    inf_x = max(finite) * 2.5 if finite else 1.0
    xs = {k: inf_x if k == "inf" else float(k) for k in eps_keys}
    fig, axes = _axes(plt, len(summary))
    for ax, ds in zip(axes, summary, strict=False):
        for meth, cells in summary[ds].items():
            if meth in PRIVATE_METHODS:
                _private_line(ax, meth, cells, xs)
            elif NP in cells:
                ax.axhline(cells[NP]["nrmse_mean"], color=_COLORS.get(meth), ls="--", lw=1.2,
                           label=f"{meth} ({cells[NP]['nrmse_mean']:.3f})")
        if eps_keys:
            ax.set_xscale("log")
            ax.set_xticks([xs[k] for k in eps_keys])
            ax.set_xticklabels([eps_label(k) for k in eps_keys])
            ax.minorticks_off()
            ax.set_xlabel(f"ε per site (δ = {delta:g})")
        ax.axhline(1.0, color="0.6", lw=0.6, ls=":")
        ax.set_ylabel("NRMSE (lower is better; 1 ≈ column mean)")
        ax.set_title(ds)
        ax.grid(alpha=0.3)
    _finish(fig, axes, title, path, plt)


def plot_sites(summary: dict[str, Any], study: Study, path: Path) -> None:
    """Each site's NRMSE per method (private methods at the study's report epsilon)."""
    plt = pyplot()
    rep = eps_key(study.report_epsilon) if study.private_methods else None
    fig, axes = _axes(plt, len(summary), w=6.4)
    for ax, ds in zip(axes, summary, strict=False):
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
                   + (f" (ε={eps_label(rep or '')})" if m in PRIVATE_METHODS else ""))
        ax.set_xticks(np.arange(len(sites)))
        ax.set_xticklabels(sites, rotation=20 if len(sites) > 4 else 0)
        ax.axhline(1.0, color="0.6", lw=0.6, ls=":")
        ax.set_ylabel("NRMSE at the site (mean ± sd over seeds)")
        ax.set_title(ds)
        ax.grid(alpha=0.3, axis="y")
    _finish(fig, axes, "Per-site error", path, plt)


def plot_privacy(summary: dict[str, Any], study: Study, path: Path) -> bool:
    """The epsilon each site spent against its budget; False (nothing drawn) without a
    private method or a finite epsilon."""
    finite = [k for k in study_eps_keys(study) if k != "inf"]
    priv = study.private_methods
    if not priv or not finite:
        return False
    plt = pyplot()
    dsets = [d for d in summary if priv[0] in summary[d]]
    fig, axes = _axes(plt, len(dsets))
    cmap = plt.get_cmap("viridis")
    for ax, ds in zip(axes, dsets, strict=False):
        cells = summary[ds][priv[0]]
        sites = list(next(iter(cells.values()))["nrmse_site"])
        width = 0.8 / len(finite)
        for i, k in enumerate(finite):
            p = cells.get(k, {}).get("privacy_site") or {}
            y = [p[s]["epsilon_spent"] if s in p else 0.0 for s in sites]
            x = np.arange(len(sites)) + (i - (len(finite) - 1) / 2) * width
            ax.bar(x, y, width, color=cmap(i / max(len(finite) - 1, 1)), label=f"budget ε={k}")
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
    _finish(fig, axes, "Privacy spent per site (one bank fit serves every private method)",
            path, plt)
    return True
