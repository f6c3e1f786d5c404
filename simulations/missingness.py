"""Missingness mechanisms: which observed cells a study hides (and then scores).

Only cells observed in the data can be hidden (a real gap has no truth); a row never loses
all of its observed cells. ``rate`` means:

one_attribute  the IIM paper's protocol: per site, ``round(rate * n_complete)`` of its
               complete rows each lose one uniformly random attribute (columns a site never
               observes do not count against "complete" and are never hidden there). One
               ``default_rng(seed)`` draws the sites in order: first the rows (ascending),
               then one column per row. ``site_rates`` gives the named sites their own
               rate; the others keep ``rate``.
mcar           every observed cell of the target ``columns`` is hidden independently with
               probability ``rate`` (missing completely at random).
mar            missing at random: the probability that a row's target cells are hidden is
               ``sigmoid(b + strength * z)``, ``z`` the row's ``driver`` value standardised
               over the federation; the driver itself is never hidden, so given the
               driver, missingness does not depend on the hidden values. ``b`` is set so
               the expected fraction of hidden target cells is ``rate``.
mnar           missing not at random (self-masking): each target cell is hidden with
               probability ``sigmoid(b_j + strength * z)``, ``z`` the cell's own value
               standardised over the federation, so larger values go missing more often;
               ``b_j`` is set per column so each column loses ``rate`` of its cells in
               expectation.

For mcar/mar/mnar the draws are made on the sites stacked in order with
``default_rng(seed)``, so a site whose values are higher loses more under mnar (the
mechanism is the federation's, not tuned per site). The target ``columns`` default to all
columns (all but the driver for mar).

``sites`` gives named sites a mechanism of their own (rate, columns, driver, strength),
drawn on that site alone (:func:`site_missingness`); the others keep the study-wide one.

Columns a site never measures (``[datasets.absent]``) are hidden first, whole
(:func:`hide_cells`); the mechanism then runs on what the site does measure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.special import expit

from simulations.config import MissingnessConfig

__all__ = ["absent_cells", "apply_missingness", "hide_cells", "mask_one_attribute",
           "mask_pooled", "site_missingness"]


def mask_one_attribute(sites: Sequence[np.ndarray], rate: float | Sequence[float], seed: int,
                       columns: Sequence[int] | None = None) -> list[np.ndarray]:
    """The paper protocol per site (see the module doc); boolean masks of hidden cells.

    ``rate`` is one fraction for every site, or one per site.
    """
    rng = np.random.default_rng(seed)
    rates = [float(rate)] * len(sites) if isinstance(rate, int | float) else list(rate)
    if len(rates) != len(sites):
        raise ValueError(f"{len(rates)} rates for {len(sites)} sites")
    masks = []
    for x, site_rate in zip(sites, rates, strict=True):
        seen = np.flatnonzero(~np.isnan(x).all(axis=0))
        complete = np.flatnonzero(~np.isnan(x[:, seen]).any(axis=1))
        cand = seen if columns is None else np.intersect1d(seen, np.asarray(columns))
        k = int(round(site_rate * len(complete))) if cand.size else 0
        rows = np.sort(rng.choice(complete, size=k, replace=False))
        cols = rng.choice(cand, size=k) if cand.size else np.zeros(0, dtype=np.int64)
        mask = np.zeros(x.shape, dtype=bool)
        mask[rows, cols] = True
        masks.append(mask)
    return masks


def _intercept(z: np.ndarray, strength: float, rate: float) -> float:
    """b with mean(sigmoid(b + strength * z)) == rate (bisection; the mean rises with b)."""
    lo, hi = -60.0, 60.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float(np.mean(expit(mid + strength * z))) < rate:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _standardise(v: np.ndarray) -> np.ndarray:
    mu, sd = np.nanmean(v), np.nanstd(v)
    return (v - mu) / (sd if sd > 0 else 1.0)


def mask_pooled(x: np.ndarray, mechanism: str, rate: float, rng: np.random.Generator, *,
                targets: Sequence[int], driver: int | None = None, strength: float = 2.0
                ) -> np.ndarray:
    """mcar / mar / mnar on one stacked table; a boolean mask of the hidden cells."""
    n, m = x.shape
    observed = ~np.isnan(x)
    t = np.zeros(m, dtype=bool)
    t[list(targets)] = True
    eligible = observed & t[None, :]
    u = rng.random((n, m))
    if mechanism == "mcar":
        p = np.full((n, m), rate)
    elif mechanism == "mar":
        assert driver is not None
        z = np.nan_to_num(_standardise(x[:, driver]))  # a missing driver counts as average
        w = eligible.sum(axis=1)                        # cells each row can lose
        zr = np.repeat(z, w)                            # one entry per eligible cell
        b = _intercept(zr, strength, rate) if zr.size else 0.0
        p = np.repeat(expit(b + strength * z)[:, None], m, axis=1)
    elif mechanism == "mnar":
        p = np.zeros((n, m))
        for j in targets:
            z = _standardise(x[:, j])
            ok = observed[:, j]
            if ok.any():
                b = _intercept(z[ok], strength, rate)
                p[ok, j] = expit(b + strength * z[ok])
    else:
        raise ValueError(f"unknown mechanism {mechanism!r}")
    mask = eligible & (u < p)
    # Never blank a row: give back the hidden cell the draw was least sure about.
    blank = np.flatnonzero(observed.any(axis=1) & (mask == observed).all(axis=1))
    for i in blank:
        cells = np.flatnonzero(mask[i])
        mask[i, cells[np.argmax(u[i, cells] / np.maximum(p[i, cells], 1e-300))]] = False
    return mask


def apply_missingness(sites: Sequence[np.ndarray], columns: Sequence[str],
                      cfg: MissingnessConfig, seed: int,
                      site_names: Sequence[str] | None = None) -> list[np.ndarray]:
    """Boolean masks (one per site) of the cells the study hides for ``seed``.

    ``site_names`` are needed when ``cfg.site_rates`` names sites.
    """
    def idx(name: str) -> int:
        return list(columns).index(name)

    targets = [idx(c) for c in cfg.columns] if cfg.columns is not None else None
    if cfg.mechanism == "one_attribute":
        if cfg.site_rates and site_names is None:
            raise ValueError("missingness.site_rates needs the sites' names")
        rates = [cfg.site_rates.get(s, cfg.rate) for s in site_names or [""] * len(sites)]
        return mask_one_attribute(sites, rates, seed, targets)
    driver = idx(cfg.driver) if cfg.driver is not None else None
    if targets is None:
        targets = [j for j in range(len(columns)) if j != driver]
    stacked = np.vstack(sites)
    mask = mask_pooled(stacked, cfg.mechanism, cfg.rate, np.random.default_rng(seed),
                       targets=targets, driver=driver, strength=cfg.strength)
    return np.split(mask, np.cumsum([len(s) for s in sites])[:-1])


def site_missingness(sites: Sequence[np.ndarray], columns: Sequence[str],
                     cfg: MissingnessConfig, seed: int, site_names: Sequence[str]
                     ) -> list[np.ndarray]:
    """:func:`apply_missingness` over the federation, then each site named in
    ``cfg.sites`` masked again on its own with its own mechanism (seeded by ``seed`` and
    the site's position), replacing its federation-wide draw."""
    masks = apply_missingness(sites, columns, cfg, seed, site_names)
    for number, (x, name) in enumerate(zip(sites, site_names, strict=True)):
        own = cfg.sites.get(name)
        if own is not None:
            masks[number] = apply_missingness([x], columns, own, seed * 1009 + number,
                                              [name])[0]
    return masks


def absent_cells(sites: Sequence[np.ndarray], columns: Sequence[str],
                 site_names: Sequence[str], absent: Mapping[str, Sequence[str]]
                 ) -> list[np.ndarray]:
    """Boolean masks (one per site) of the cells of the columns a site never measures,
    where the data has a true value to score against."""
    masks = []
    for x, name in zip(sites, site_names, strict=True):
        mask = np.zeros(x.shape, dtype=bool)
        for c in absent.get(name, ()):
            j = list(columns).index(c)
            mask[:, j] = ~np.isnan(x[:, j])
        masks.append(mask)
    return masks


def hide_cells(sites: Sequence[np.ndarray], columns: Sequence[str],
               site_names: Sequence[str], absent: Mapping[str, Sequence[str]],
               cfg: MissingnessConfig, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(hidden, never measured): the cells the mechanism hides, drawn on the sites with
    their never-measured columns already gone, and the never-measured cells themselves.

    Without ``absent`` the masks are those of :func:`apply_missingness` on the sites.
    """
    never = absent_cells(sites, columns, site_names, absent)
    seen = [np.where(a, np.nan, x) if a.any() else x
            for x, a in zip(sites, never, strict=True)]
    return site_missingness(seen, columns, cfg, seed, site_names), never
