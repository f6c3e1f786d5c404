"""The model bank: every site's noised leaf cells, and IIM over cells.

A bank holds, per cell: the opaque site id, the cell's public box, its noised augmented Gram
matrix (symmetrised, PSD, in the federation's scaled coordinates: each attribute's public
bounds mapped to [-1/2, 1/2]) and the noise scale it was released with. Everything below
is post-processing of those matrices, so it costs no privacy budget.

IIM over cells. A cell plays the part of a tuple: its anchor is its noisy centroid, and its
individual model for ``ell`` is the ridge fit on the *sum* of the Gram matrices of its
``ell`` nearest cells (anchor distance on the observed features F) — cumulative sums along
each neighbour list, as in IIM's incremental learning. The adaptive choice of ``ell`` (and so
between a local model and the global one) is IIM's Alg. 3 with the validation error of a
model on a neighbouring cell read off that cell's Gram matrix:
``sum (y - x phi)^2 = y^T y - 2 phi^T V' + phi^T U' phi``. The ridge penalty grows with the
noise of the pooled matrix (AdaSSP-style, ``alpha ~ sigma sqrt(d)``). Imputation: the k nearest
anchors give candidates, combined by candidate-distance voting.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fediim.atomic import atomic_write_bytes
from fediim.gram import gram_centroid, subsystem_index, subsystem_sse
from fediim.iim import PatternResult, ridge_solve
from fediim.neighbors import NeighborIndex

__all__ = ["BANK_FORMAT", "BankError", "ModelBank", "CellPatternModels", "BankConfig"]

BANK_FORMAT = "fediim-bank/1"


class BankError(ValueError):
    """A bank file that cannot be trusted or read."""


@dataclass(frozen=True)
class BankConfig:
    """Post-processing choices for imputing from a bank.

    n_neighbors : k anchors per query (and validation neighbours per cell).
    ell_grid : candidate numbers of pooled cells; ``None`` = roughly geometric up to all.
    alpha : base ridge penalty (scaled coordinates).
    noise_alpha : multiplier of the noise-driven part of the penalty (0.03 measured best
        on ccpp at epsilon = 1 among 0-10: the noise estimate is conservative).
    """

    n_neighbors: int = 10
    ell_grid: tuple[int, ...] | None = None
    alpha: float = 1e-3
    noise_alpha: float = 0.03


@dataclass
class ModelBank:
    """Noised leaf cells of all sites (see module docstring)."""

    n_features: int
    site: np.ndarray  # (C,) str, opaque site ids
    cell: np.ndarray  # (C,) str, opaque cell ids
    lo: np.ndarray  # (C, m) public cell boxes, scaled coordinates
    hi: np.ndarray  # (C, m)
    gram: np.ndarray  # (C, m+1, m+1) noised Gram, scaled coordinates, PSD
    sigma: np.ndarray  # (C,) noise std of the release, in the cell's own coordinates
    min_records: int = 10
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        c = len(self.site)
        m = self.n_features
        shapes = {
            "cell": (self.cell.shape, (c,)), "lo": (self.lo.shape, (c, m)),
            "hi": (self.hi.shape, (c, m)), "gram": (self.gram.shape, (c, m + 1, m + 1)),
            "sigma": (self.sigma.shape, (c,)),
        }
        for name, (got, want) in shapes.items():
            if tuple(got) != want:
                raise BankError(f"bank field {name!r} has shape {got}, expected {want}")
        if c and np.any(self.counts < self.min_records):
            raise BankError(f"bank holds cells describing fewer than {self.min_records} "
                            "records; they must be dropped before a bank is formed")

    @property
    def n_cells(self) -> int:
        return len(self.site)

    @property
    def counts(self) -> np.ndarray:
        """Noisy record count of each cell."""
        return self.gram[:, 0, 0]

    @property
    def anchors(self) -> np.ndarray:
        """Noisy centroid of each cell (scaled coordinates)."""
        return gram_centroid(self.gram)

    def select(self, mask: np.ndarray) -> ModelBank:
        """The bank restricted to the cells where ``mask`` is True."""
        return ModelBank(
            n_features=self.n_features, site=self.site[mask], cell=self.cell[mask],
            lo=self.lo[mask], hi=self.hi[mask], gram=self.gram[mask], sigma=self.sigma[mask],
            min_records=self.min_records, meta=dict(self.meta),
        )

    def pooled_gram(self) -> np.ndarray:
        """Sum of all cells: the federation-wide statistic (global model, mean, spread)."""
        return self.gram.sum(axis=0)

    def feature_scale(self) -> np.ndarray:
        """Federation-wide standard deviation per attribute, read off the pooled Gram.

        Used to standardise anchor distances (bounds may be much wider than the data).
        """
        g = self.pooled_gram()
        n = max(g[0, 0], 1.0)
        mean = g[0, 1:] / n
        var = np.diag(g)[1:] / n - mean**2
        return np.sqrt(np.maximum(var, 1e-12))

    @classmethod
    def concat(cls, banks: list[ModelBank], meta: dict[str, Any] | None = None) -> ModelBank:
        """Merge per-site banks into one federation bank."""
        if not banks:
            raise BankError("no cells to assemble a bank from")
        m = {b.n_features for b in banks}
        if len(m) != 1:
            raise BankError(f"banks disagree on the number of features: {sorted(m)}")
        return cls(
            n_features=m.pop(),
            site=np.concatenate([b.site for b in banks]),
            cell=np.concatenate([b.cell for b in banks]),
            lo=np.concatenate([b.lo for b in banks]),
            hi=np.concatenate([b.hi for b in banks]),
            gram=np.concatenate([b.gram for b in banks]),
            sigma=np.concatenate([b.sigma for b in banks]),
            min_records=max(b.min_records for b in banks),
            meta=dict(meta or {}),
        )

    # -- serialisation ------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """Versioned serialisation: an npz with the arrays and a JSON manifest."""
        manifest = {
            "format": BANK_FORMAT, "n_features": self.n_features, "n_cells": self.n_cells,
            "min_records": self.min_records, "meta": self.meta,
        }
        buf = io.BytesIO()
        np.savez(
            buf, manifest=np.array(json.dumps(manifest, sort_keys=True)),
            site=self.site.astype(str), cell=self.cell.astype(str), lo=self.lo, hi=self.hi,
            gram=self.gram, sigma=self.sigma,
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> ModelBank:
        """Inverse of :meth:`to_bytes`; a clear :class:`BankError` on anything unexpected."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                manifest = json.loads(str(z["manifest"]))
                arrays = {k: z[k] for k in ("site", "cell", "lo", "hi", "gram", "sigma")}
        except Exception as exc:  # noqa: BLE001 - any parse failure is a bad bank
            raise BankError(f"{source}: not a readable fediim bank ({exc})") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != BANK_FORMAT:
            got = manifest.get("format") if isinstance(manifest, dict) else manifest
            raise BankError(f"{source}: format {got!r}, expected {BANK_FORMAT!r}")
        for key in ("n_features", "min_records"):
            if not isinstance(manifest.get(key), int) or isinstance(manifest.get(key), bool):
                raise BankError(f"{source}: manifest key {key!r} must be an integer, got "
                                f"{manifest.get(key)!r}")
        meta = manifest.get("meta", {})
        if not isinstance(meta, dict):
            raise BankError(f"{source}: manifest key 'meta' must be an object")
        for k in ("lo", "hi", "gram", "sigma"):
            if arrays[k].dtype.kind != "f" or not np.all(np.isfinite(arrays[k])):
                raise BankError(f"{source}: bank array {k!r} must hold finite floats (found "
                                "non-finite or non-float values)")
        return cls(n_features=manifest["n_features"], min_records=manifest["min_records"],
                   meta=meta, **arrays)

    def save(self, path: str | Path) -> None:
        """Write the bank atomically."""
        atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> ModelBank:
        return cls.from_bytes(Path(path).read_bytes(), source=str(path))


def default_cell_grid(n_cells: int) -> np.ndarray:
    """1, 2, 3, 5, 8, ... (roughly geometric) up to all cells."""
    g = {1, 2, 3}
    v = 3.0
    while v < n_cells:
        v *= 1.6
        g.add(int(round(v)))
    return np.unique(np.clip(np.array(sorted(g)), 1, max(n_cells, 1)))


class CellPatternModels:
    """IIM over the bank's cells for one (target, features) pattern."""

    def __init__(self, bank: ModelBank, target: int, features: tuple[int, ...],
                 config: BankConfig) -> None:
        self.bank, self.target, self.features, self.config = bank, target, features, config
        idx = subsystem_index(target, features)
        # Work in standardised coordinates (federation-wide std per attribute, read off the
        # pooled Gram): ridge penalties then mean the same as in the centralized engine,
        # whatever the public bounds were.
        std = np.concatenate([[1.0], bank.feature_scale()])[idx]
        self._std = std
        self._g = bank.gram[:, idx[:, None], idx[None, :]] / np.outer(std, std)
        # Noise std of a Gram entry in these coordinates: the cell's release std, scaled by
        # how far the cell's coordinates stretch (|center| + width per attribute).
        reach = (np.abs(0.5 * (bank.lo + bank.hi)) + (bank.hi - bank.lo))[:, idx[1:] - 1]
        stretch = np.max(reach / std[1:], axis=1) ** 2
        self._noise = (bank.sigma * np.maximum(stretch, 1.0)) ** 2
        self._anchors = bank.anchors[:, list(features)] / std[1:-1]
        self._index = NeighborIndex(self._anchors)
        c = bank.n_cells
        grid = config.ell_grid
        self._grid = default_cell_grid(c) if grid is None else np.unique(
            np.minimum(np.asarray(grid, dtype=int), c))
        self._phi: np.ndarray | None = None
        self._ell: np.ndarray | None = None

    def _alpha(self, noise_var: np.ndarray) -> np.ndarray:
        p = len(self.features) + 1
        return self.config.alpha + self.config.noise_alpha * np.sqrt(noise_var) * np.sqrt(p)

    def _learn(self) -> None:
        c = self.bank.n_cells
        p = len(self.features) + 1
        lmax = int(self._grid[-1])
        _, nbr = self._index.query(self._anchors, lmax)
        cands, pooled, pooled_nv = [], [], []
        g = np.zeros((c, p + 1, p + 1))
        nv = np.zeros(c)
        prev = 0
        for ell in self._grid:
            g += self._g[nbr[:, prev:ell]].sum(axis=1)
            nv += self._noise[nbr[:, prev:ell]].sum(axis=1)
            prev = int(ell)
            cands.append(ridge_solve(g, self._alpha(nv)))
            pooled.append(g.copy())
            pooled_nv.append(nv.copy())
        cands = np.stack(cands, axis=1)  # (C, L, p)
        k = min(self.config.n_neighbors, c - 1)
        if len(self._grid) > 1 and k > 0:
            _, vn = self._index.query(self._anchors, k + 1)
            keep = vn != np.arange(c)[:, None]
            keep[keep.all(axis=1), -1] = False
            i = vn[keep].reshape(c, k).ravel()
            j = np.repeat(np.arange(c), k)
            cost = np.zeros((c, len(self._grid)))
            gj = self._g[j]
            # Leave-cell-out: where validation cell j is one of the ell cells pooled into
            # i's model, score the model refitted without it (the cell analogue of LOO).
            match = nbr[i] == j[:, None]
            rank = np.where(match.any(axis=1), match.argmax(axis=1), c)
            for li, ell in enumerate(self._grid):
                phi = cands[i, li]
                inside = np.flatnonzero(rank < ell)
                if inside.size:
                    ii, jj = i[inside], j[inside]
                    phi = phi.copy()
                    phi[inside] = ridge_solve(pooled[li][ii] - self._g[jj],
                                              self._alpha(pooled_nv[li][ii] - self._noise[jj]))
                sse = subsystem_sse(phi, gj)
                cost[:, li] = np.bincount(i, weights=sse, minlength=c)
            best = np.argmin(cost, axis=1)
            best[np.bincount(i, minlength=c) == 0] = len(self._grid) - 1
        else:
            best = np.full(c, len(self._grid) - 1)
        self._phi = cands[np.arange(c), best]
        self._ell = self._grid[best]

    def impute(self, queries: np.ndarray) -> PatternResult:
        """Impute the target for queries given on F (scaled coordinates)."""
        if self._phi is None:
            self._learn()
        assert self._phi is not None and self._ell is not None
        k = min(self.config.n_neighbors, self.bank.n_cells)
        qs = np.asarray(queries) / self._std[1:-1]
        _, nbr = self._index.query(qs, k)
        qaug = np.column_stack([np.ones(len(qs)), qs])
        cand = np.einsum("qf,qkf->qk", qaug, self._phi[nbr]) * self._std[-1]
        return PatternResult.vote(cand, nbr, self._ell[nbr])
