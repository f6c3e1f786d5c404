"""The federation's principal axes: a public frame the shared partition is cut in.

Under secure sums, a plan with ``principal_axes`` spends its clipping budget on one
release before the partition: the summed augmented Gram of every site's complete records
in the public bounds' coordinates (:func:`moments_share`; mechanism: distributed discrete
Gaussian, L2 sensitivity :func:`moments_sensitivity`, ρ = the plan's ``rho_clip``). The
coordinator reads the federation's mean μ and covariance Σ off the sum and publishes a
:class:`Frame`: ``z = A (x - μ)`` with the rows of A the eigenvectors of Σ, each divided
by ``2 c sqrt(λ + τ)`` (``c`` = :data:`FRAME_SPREAD`), so the box [-1/2, 1/2] in z spans
μ ± c standard deviations along every principal axis. τ floors the eigenvalues at the
spectral size of the release's noise (:func:`eigenvalue_floor`): a thin axis whose noisy
variance came out near zero keeps a box wide enough for its records. Coded (one-hot)
columns keep the public coordinates (they are not rotated).

Every site clamps its records to that box in z (:meth:`Frame.to_frame`; clamping keeps
the counts' and Grams' sensitivities), and the tree counts and leaf Grams are formed in z.
The released Grams map back to the public coordinates exactly (:meth:`Frame.gram_back`);
the bank keeps the frame (:func:`bank_frame`) so that readers can find a record's cell and
a cell's box in z. Everything after the moments sum is post-processing of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fediim.federated.gram import from_upper_triangle, transform_gram

__all__ = ["FRAME_SPREAD", "Frame", "bank_frame", "eigenvalue_floor", "frame_from_moments",
           "moments_upper"]

#: Half-width of the frame's box in standard deviations along each principal axis
#: (benchmarks/README.md, "A partition along the principal axes": 3 against 2.5 and 4).
FRAME_SPREAD = 3.0


@dataclass(frozen=True)
class Frame:
    """``z = matrix @ x + offset`` (public bounds' coordinates x to frame coordinates z)."""

    matrix: np.ndarray  # (m, m)
    offset: np.ndarray  # (m,)

    def to_frame(self, rows: np.ndarray) -> np.ndarray:
        """Rows in frame coordinates, clamped to [-1/2, 1/2] (NaN rows stay NaN)."""
        return np.clip(np.asarray(rows, np.float64) @ self.matrix.T + self.offset, -0.5, 0.5)

    def from_frame(self, z: np.ndarray) -> np.ndarray:
        """Frame coordinates back to the public bounds' coordinates."""
        return np.linalg.solve(self.matrix, (np.asarray(z, np.float64) - self.offset).T).T

    def augmented(self) -> np.ndarray:
        """The (m+1, m+1) map of augmented rows (1, x) to (1, z) (see
        :func:`~fediim.federated.gram.affine_map`)."""
        size = len(self.offset) + 1
        matrix = np.eye(size)
        matrix[1:, 1:], matrix[1:, 0] = self.matrix, self.offset
        return matrix

    def gram_back(self, grams: np.ndarray) -> np.ndarray:
        """Grams of records in frame coordinates as Grams in the public coordinates."""
        return transform_gram(grams, np.linalg.inv(self.augmented()))

    def to_meta(self) -> dict[str, list]:
        """The frame as JSON lists (float64 round-trips exactly through ``repr``)."""
        return {"matrix": self.matrix.tolist(), "offset": self.offset.tolist()}

    @classmethod
    def from_meta(cls, doc: dict) -> Frame:
        matrix = np.asarray(doc["matrix"], np.float64)
        offset = np.asarray(doc["offset"], np.float64)
        if matrix.ndim != 2 or matrix.shape != (len(offset), len(offset)) or not (
                np.all(np.isfinite(matrix)) and np.all(np.isfinite(offset))):
            raise ValueError("a frame needs a finite (m, m) matrix and (m,) offset")
        return cls(matrix, offset)


def moments_upper(rows: np.ndarray) -> np.ndarray:
    """Per record, the upper triangle of its augmented Gram ``(1, x)(1, x)ᵀ``."""
    rows = np.asarray(rows, np.float64)
    augmented = np.column_stack([np.ones(len(rows)), rows])
    upper = np.triu_indices(rows.shape[1] + 1)
    return augmented[:, upper[0]] * augmented[:, upper[1]]


def eigenvalue_floor(noise_sigma: float, n_records: float, n_rotated: int) -> float:
    """τ = 2 √m σ / n: the spectral norm of an m × m symmetric matrix of independent
    noise of std σ / n (the covariance's noise from the summed Gram's)."""
    return 2.0 * math.sqrt(n_rotated) * noise_sigma / max(n_records, 1.0)


def frame_from_moments(total_upper: np.ndarray, n_features: int, fixed: np.ndarray,
                       noise_sigma: float, spread: float = FRAME_SPREAD) -> Frame:
    """The public frame read off the summed moments (upper triangle, public coordinates;
    ``noise_sigma`` its std per entry, same units); ``fixed`` columns keep the public
    coordinates."""
    gram = from_upper_triangle(np.asarray(total_upper, np.float64), n_features + 1)
    count = max(gram[0, 0], 1.0)
    mean = gram[0, 1:] / count
    covariance = gram[1:, 1:] / count - np.outer(mean, mean)
    free = ~np.asarray(fixed, bool)
    matrix, offset = np.eye(n_features), np.zeros(n_features)
    if free.any():
        block = covariance[np.ix_(free, free)]
        values, vectors = np.linalg.eigh(0.5 * (block + block.T))
        floor = eigenvalue_floor(noise_sigma, count, int(free.sum()))
        values = np.maximum(values, 0.0) + floor + 1e-12
        rotation = vectors.T / (2.0 * spread * np.sqrt(values))[:, None]
        matrix[np.ix_(free, free)] = rotation
        offset[free] = -rotation @ mean[free]
    return Frame(matrix, offset)


def bank_frame(meta: dict) -> Frame | None:
    """The frame a bank's cells were cut in (None: the public coordinates)."""
    doc = meta.get("frame")
    return None if doc is None else Frame.from_meta(doc)


def frame_boxes(frame: Frame | None, lo: np.ndarray, hi: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned bounding boxes, in the public coordinates, of cell boxes given in
    ``frame`` coordinates (the boxes themselves without a frame)."""
    if frame is None:
        return lo, hi
    inverse = np.linalg.inv(frame.matrix)
    center = (0.5 * (lo + hi) - frame.offset) @ inverse.T
    half = (0.5 * (hi - lo)) @ np.abs(inverse).T
    return center - half, center + half


def covariance_to_frame(frame: Frame | None, covariance: np.ndarray) -> np.ndarray:
    """Covariances (..., m, m) of public coordinates in frame coordinates."""
    if frame is None:
        return covariance
    return frame.matrix @ covariance @ frame.matrix.T


def covariance_from_frame(frame: Frame | None, covariance: np.ndarray) -> np.ndarray:
    """Inverse of :func:`covariance_to_frame`."""
    if frame is None:
        return covariance
    inverse = np.linalg.inv(frame.matrix)
    return inverse @ covariance @ inverse.T

