"""The model bank: every site's noised leaf cells (data and file format).

A bank holds, per cell: the opaque site id, the cell's public box, its noised augmented Gram
matrix (symmetrised, PSD, in the federation's scaled coordinates: each attribute's public
bounds mapped to [-1/2, 1/2]) and the noise scale it was released with. Everything read
from it (:mod:`fediim.federated.engines`) is post-processing of those matrices, so it
costs no privacy budget.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fediim.errors import BankError
from fediim.federated.gram import gram_centroid
from fediim.federated.principal import Frame, bank_frame
from fediim.io.atomic import atomic_write_bytes

__all__ = [
    "BANK_FORMAT", "BankError", "ModelBank", "BankConfig", "NOISE_ALPHA_GRID",
    "DEFAULT_NOISE_ALPHA",
]

BANK_FORMAT = "fediim-bank/1"


#: Noise-penalty multipliers a site chooses from on its own rows (see BankConfig).
NOISE_ALPHA_GRID = (0.03, 0.3, 3.0)
#: The multiplier where nothing chooses one (benchmarks/README.md, "Engine notes").
DEFAULT_NOISE_ALPHA = 0.03


@dataclass(frozen=True)
class BankConfig:
    """Post-processing choices for imputing from a bank.

    n_neighbors : k anchors per query (and validation neighbours per cell).
    ell_grid : candidate numbers of pooled cells; ``None`` = roughly geometric up to all.
    alpha : base ridge penalty (scaled coordinates).
    noise_alpha : multiplier of the noise-driven part of the penalty. ``None`` (default):
        a site chooses it per pattern and target on its own rows from
        :data:`NOISE_ALPHA_GRID` (``site_impute``), else :data:`DEFAULT_NOISE_ALPHA`. The
        best value depends on the data (how many attributes, how many records per cell),
        which is why a site chooses it.
    engine : "cells" (IIM over cells), "mixture" (conditional mean of the cells as a
        Gaussian mixture; on a noised bank with the federation's tied within-cell
        covariance) or "auto": mixture for an exact bank (every sigma = 0), cells for a
        noised one; federated mode then chooses between the two on the site's rows.
    mixture_prior : pseudo-records of the in-box uniform covariance added to each cell's
        covariance in the mixture (keeps thin cells' Gaussians proper).
    """

    n_neighbors: int = 10
    ell_grid: tuple[int, ...] | None = None
    alpha: float = 1e-3
    noise_alpha: float | None = None
    engine: str = "auto"
    mixture_prior: float = 0.03

    def __post_init__(self) -> None:
        if self.engine not in ("auto", "cells", "mixture"):
            raise ValueError(f"engine must be auto, cells or mixture; got {self.engine!r}")
        if not self.mixture_prior > 0:
            raise ValueError(f"mixture_prior must be > 0, got {self.mixture_prior}")
        if self.noise_alpha is not None and not self.noise_alpha >= 0:
            raise ValueError(f"noise_alpha must be >= 0 or None, got {self.noise_alpha}")


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
    tree: np.ndarray | None = None  # (C,) int, which of a site's partitions; None = all 0
    # (C, m) the releasing site's clipping box (scaled coordinates): its records were
    # clamped to it; None = the public bounds [-1/2, 1/2].
    clip_lo: np.ndarray | None = None
    clip_hi: np.ndarray | None = None
    # (C, m) bool: which attributes the releasing site measures. An attribute a site never
    # measures carries zeros in its cells' Gram rows and columns; None = all measured.
    observed: np.ndarray | None = None

    def __post_init__(self) -> None:
        n_cells, n_features = len(self.site), self.n_features
        if self.tree is None:
            self.tree = np.zeros(n_cells, dtype=np.int64)
        if self.clip_lo is None:
            self.clip_lo = np.full((n_cells, n_features), -0.5)
        if self.clip_hi is None:
            self.clip_hi = np.full((n_cells, n_features), 0.5)
        if self.observed is None:
            self.observed = np.ones((n_cells, n_features), dtype=bool)
        if self.observed.dtype != bool:
            raise BankError("bank field 'observed' must hold booleans")
        shapes = {
            "cell": (self.cell.shape, (n_cells,)),
            "lo": (self.lo.shape, (n_cells, n_features)),
            "hi": (self.hi.shape, (n_cells, n_features)),
            "gram": (self.gram.shape, (n_cells, n_features + 1, n_features + 1)),
            "sigma": (self.sigma.shape, (n_cells,)), "tree": (self.tree.shape, (n_cells,)),
            "clip_lo": (self.clip_lo.shape, (n_cells, n_features)),
            "clip_hi": (self.clip_hi.shape, (n_cells, n_features)),
            "observed": (self.observed.shape, (n_cells, n_features)),
        }
        for name, (got, want) in shapes.items():
            if tuple(got) != want:
                raise BankError(f"bank field {name!r} has shape {got}, expected {want}")
        if n_cells and np.any(self.counts < self.min_records):
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
            min_records=self.min_records, meta=dict(self.meta), tree=self.tree[mask],
            clip_lo=self.clip_lo[mask], clip_hi=self.clip_hi[mask],
            observed=self.observed[mask],
        )

    @property
    def frame(self) -> Frame | None:
        """The principal-axis frame the cells' boxes (``lo``, ``hi``, ``clip_lo``,
        ``clip_hi``) are given in (None: the public bounds' coordinates, like the Grams)."""
        return bank_frame(self.meta)

    @property
    def n_trees(self) -> int:
        """Partitions per site: every record is described once per tree."""
        return int(self.tree.max()) + 1 if self.n_cells else 1

    def pooled_gram(self) -> np.ndarray:
        """Sum of all cells per tree: the federation-wide statistic (global model, mean,
        spread). With several trees each describes every record once, so their sum is
        divided by the number of trees (an average of the trees' estimates)."""
        return self.gram.sum(axis=0) / self.n_trees

    def column_moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Federation-wide mean and variance per attribute, each from the cells that
        measure it (per tree, averaged over trees like :meth:`pooled_gram`)."""
        weight = self.observed / self.n_trees  # (C, m)
        count = np.maximum(weight.T @ self.gram[:, 0, 0], 1.0)
        mean = np.einsum("cm,cm->m", weight, self.gram[:, 0, 1:]) / count
        square = np.einsum("cm,cm->m", weight,
                           np.diagonal(self.gram, axis1=1, axis2=2)[:, 1:]) / count
        return mean, square - mean**2

    def feature_scale(self) -> np.ndarray:
        """Federation-wide standard deviation per attribute (:meth:`column_moments`).

        Used to standardise anchor distances (bounds may be much wider than the data).
        """
        return np.sqrt(np.maximum(self.column_moments()[1], 1e-12))

    @classmethod
    def concat(cls, banks: list[ModelBank], meta: dict[str, Any] | None = None) -> ModelBank:
        """Merge per-site banks into one federation bank."""
        if not banks:
            raise BankError("no cells to assemble a bank from")
        widths = {bank.n_features for bank in banks}
        if len(widths) != 1:
            raise BankError(f"banks disagree on the number of features: {sorted(widths)}")
        fields = ("site", "cell", "lo", "hi", "gram", "sigma", "tree", "clip_lo", "clip_hi",
                  "observed")
        return cls(
            n_features=widths.pop(),
            min_records=max(bank.min_records for bank in banks),
            meta=dict(meta or {}),
            **{name: np.concatenate([getattr(bank, name) for bank in banks])
               for name in fields},
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
            gram=self.gram, sigma=self.sigma, tree=self.tree.astype(np.int64),
            clip_lo=self.clip_lo, clip_hi=self.clip_hi, observed=self.observed,
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> ModelBank:
        """Inverse of :meth:`to_bytes`; a clear :class:`BankError` on anything unexpected."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                manifest = json.loads(str(archive["manifest"]))
                arrays = {name: archive[name]
                          for name in ("site", "cell", "lo", "hi", "gram", "sigma")}
                tree = archive["tree"] if "tree" in archive.files else None
                clip = {name: archive[name] for name in ("clip_lo", "clip_hi")
                        if name in archive.files}
                observed = archive["observed"] if "observed" in archive.files else None
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
        arrays.update(clip)
        for name in sorted(arrays.keys() - {"site", "cell"}):
            if arrays[name].dtype.kind != "f" or not np.all(np.isfinite(arrays[name])):
                raise BankError(f"{source}: bank array {name!r} must hold finite floats (found "
                                "non-finite or non-float values)")
        if tree is not None and (tree.dtype.kind not in "iu" or np.any(tree < 0)):
            raise BankError(f"{source}: bank array 'tree' must hold non-negative integers")
        if observed is not None and observed.dtype != bool:
            raise BankError(f"{source}: bank array 'observed' must hold booleans")
        try:
            return cls(n_features=manifest["n_features"], min_records=manifest["min_records"],
                       meta=meta, tree=tree, observed=observed, **arrays)
        except BankError as exc:
            raise BankError(f"{source}: {exc}") from exc

    def save(self, path: str | Path) -> None:
        """Write the bank atomically."""
        atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> ModelBank:
        return cls.from_bytes(Path(path).read_bytes(), source=str(path))
