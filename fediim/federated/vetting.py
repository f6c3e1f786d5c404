"""Vetting released cells against the privacy plan, at the coordinator and at every site.

A release or a bank is trusted only as far as its shape allows: a curious coordinator can
send a site a crafted bank (degenerate boxes, σ = 0, NaN) to probe its records through the
site's behaviour, and a malicious site can send the coordinator cells that spoil every
other site's imputations. Both sides therefore check every cell against what the public
plan allows before using it, and reject the release or the bank as a whole.

What an honest release satisfies (scaled coordinates, each attribute's public bounds
mapped to [-1/2, 1/2]):

- shapes agree with the schema's width; every number is finite;
- each cell's box lies inside [-1/2, 1/2] with ``lo < hi``; its tree index is below the
  plan's number of trees;
- every cell was released with the plan's noise σ and ``min_records``;
- every Gram matrix is symmetric and positive semi-definite (the site projects it);
- counts lie in [min_records, max_records], where ``max_records`` is the federation's
  public cap on one site's records; the other entries are bounded by what records in
  [-1/2, 1/2] plus the plan's noise can produce.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fediim.errors import BankError
from fediim.federated.bank import ModelBank
from fediim.federated.plan import PrivacyPlan

__all__ = ["DEFAULT_MAX_RECORDS", "ReleaseLimits", "bank_problems", "release_problems"]

#: The public cap on one site's records, unless the federation declares another.
DEFAULT_MAX_RECORDS = 10_000_000
#: Noise allowance, in noise standard deviations, for a released entry.
_NOISE_SDS = 8.0
#: Relative float slack for the box, symmetry and eigenvalue checks.
_RTOL = 1e-9


@dataclass(frozen=True)
class ReleaseLimits:
    """What the public plan allows a release to hold."""

    n_features: int
    sigma_gram: float
    min_records: int
    n_trees: int
    max_records: int = DEFAULT_MAX_RECORDS

    @classmethod
    def from_plan(cls, plan: PrivacyPlan, n_features: int,
                  max_records: int = DEFAULT_MAX_RECORDS) -> ReleaseLimits:
        """The limits of releases made under ``plan`` over ``n_features`` attributes."""
        return cls(n_features=n_features, sigma_gram=float(plan.sigma_gram),
                   min_records=int(plan.min_records), n_trees=int(plan.n_trees),
                   max_records=int(max_records))


def release_problems(release: ModelBank, limits: ReleaseLimits) -> list[str]:
    """Why one site's release does not fit the plan; empty if it does."""
    problems = _shape_problems(release, limits)
    if release.min_records != limits.min_records:  # an empty release's manifest too
        problems.append(f"min_records {release.min_records}, the plan's is "
                        f"{limits.min_records}")
    if problems or release.n_cells == 0:
        return problems
    problems += _box_problems(release, limits)
    problems += _noise_problems(release, limits)
    problems += _gram_problems(release, limits)
    return problems


def bank_problems(bank: ModelBank, limits: ReleaseLimits) -> list[str]:
    """Why a federation's bank does not fit the plan: every site's part is a release."""
    if bank.n_features != limits.n_features:
        return [f"the bank has {bank.n_features} attributes, the schema {limits.n_features}"]
    problems: list[str] = []
    for site in map(str, np.unique(bank.site.astype(str))):
        try:
            part = bank.select(bank.site.astype(str) == site)
        except BankError as exc:
            problems.append(f"cells of site {site!r}: {exc}")
            continue
        problems += [f"cells of site {site!r}: {p}" for p in release_problems(part, limits)]
    return problems


def _shape_problems(release: ModelBank, limits: ReleaseLimits) -> list[str]:
    m = limits.n_features
    if release.n_features != m:
        return [f"{release.n_features} attributes, expected {m}"]
    arrays = {"lo": release.lo, "hi": release.hi, "gram": release.gram,
              "sigma": release.sigma}
    problems = [f"{name} holds non-finite or non-numeric values"
                for name, arr in arrays.items()
                if arr.dtype.kind != "f" or not np.all(np.isfinite(arr))]
    if release.tree is None or np.any(release.tree < 0) or np.any(
            release.tree >= limits.n_trees):
        problems.append(f"tree indices outside [0, {limits.n_trees})")
    return problems


def _box_problems(release: ModelBank, limits: ReleaseLimits) -> list[str]:
    problems = []
    if np.any(release.lo >= release.hi):
        problems.append("a cell box with lo >= hi")
    edge = 0.5 * (1.0 + _RTOL)
    if np.any(release.lo < -edge) or np.any(release.hi > edge):
        problems.append("a cell box outside the public bounds")
    clip_lo, clip_hi = release.clip_lo, release.clip_hi
    if (np.any(clip_lo >= clip_hi) or np.any(clip_lo < -edge) or np.any(clip_hi > edge)
            or len(np.unique(np.hstack([clip_lo, clip_hi]), axis=0)) > 1):
        problems.append("clipping boxes that are not one box inside the public bounds")
    elif np.any(release.lo < clip_lo - _RTOL) or np.any(release.hi > clip_hi + _RTOL):
        problems.append("a cell box outside the site's clipping box")
    return problems


def _noise_problems(release: ModelBank, limits: ReleaseLimits) -> list[str]:
    problems = []
    if not np.allclose(release.sigma, limits.sigma_gram, rtol=_RTOL, atol=0.0):
        problems.append(f"cells released with noise other than the plan's "
                        f"sigma={limits.sigma_gram:.6g}")
    return problems


def _gram_problems(release: ModelBank, limits: ReleaseLimits) -> list[str]:
    gram = release.gram
    scale = np.maximum(1.0, np.abs(gram).max(axis=(1, 2)))
    problems = []
    unmeasured = ~np.concatenate([np.ones((release.n_cells, 1), bool), release.observed], 1)
    if np.any(unmeasured[:, :, None] & (gram != 0)):
        problems.append("Gram entries for an attribute the site does not measure")
    if np.any(np.abs(gram - gram.transpose(0, 2, 1)).max(axis=(1, 2)) > _RTOL * scale):
        problems.append("a Gram matrix that is not symmetric")
    elif np.any(np.linalg.eigvalsh(gram)[:, 0] < -1e-6 * scale):
        problems.append("a Gram matrix that is not positive semi-definite")
    counts = release.counts
    noise = _NOISE_SDS * limits.sigma_gram
    if np.any(counts < limits.min_records) or np.any(counts > limits.max_records + noise):
        problems.append(f"a cell count outside [{limits.min_records}, {limits.max_records}]")
    for tree in np.unique(release.tree):
        in_tree = counts[release.tree == tree]
        if in_tree.sum() > limits.max_records + noise * np.sqrt(len(in_tree)):
            problems.append(f"tree {int(tree)} describes more than {limits.max_records} "
                            "records")
    if np.any(np.abs(gram) > _entry_cap(counts, limits)[:, None, None]):
        problems.append("Gram entries larger than records inside the bounds can produce")
    return problems


def _entry_cap(counts: np.ndarray, limits: ReleaseLimits) -> np.ndarray:
    """Largest |entry| of a cell's Gram matrix: records in [-1/2, 1/2] plus the noise.

    Without noise |G_ij| <= count (the intercept row) and the cell's noise, released in the
    cell's own coordinates, grows by at most (|center| + width)^2 <= 2.25 per entry when
    mapped back, summed over the (m + 1)^2 entries it mixes.
    """
    m1 = limits.n_features + 1
    return np.maximum(counts, 0.0) + _NOISE_SDS * limits.sigma_gram * 2.25 * m1**2 + 1e-9
