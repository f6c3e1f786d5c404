"""The one statistic: augmented Gram matrices, and everything read off them.

For a set S of records scaled into public bounds, ``G_S = sum_{t in S} z z^T`` with
``z = (1, t[A_1], ..., t[A_m])``. G holds the count (``G[0, 0]``), the sums (centroid =
``G[0, 1:] / G[0, 0]``), and ``U = X^T X``, ``V = X^T Y`` for every choice of target A and
feature set F at once. Ridge models, their residual error on another set, and GLR are
post-processing of Gram matrices, so a site need release nothing else.

All functions accept stacked Gram matrices of shape (..., m + 1, m + 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "augmented_gram",
    "augmented_upper_size",
    "gram_count",
    "gram_centroid",
    "subsystem_index",
    "subsystem_sse",
    "upper_triangle",
    "from_upper_triangle",
    "project_psd",
    "affine_map",
    "transform_gram",
]


def augmented_gram(values: np.ndarray) -> np.ndarray:
    """``sum_t z z^T`` over the rows of ``values`` (n, m), z = (1, t)."""
    values = np.asarray(values, dtype=np.float64)
    augmented = np.column_stack([np.ones(len(values)), values])
    return augmented.T @ augmented


def gram_count(gram: np.ndarray) -> np.ndarray:
    """Number of records (noisy if G is)."""
    return gram[..., 0, 0]


def gram_centroid(gram: np.ndarray, min_count: float = 1.0) -> np.ndarray:
    """Centroid ``G[0, 1:] / G[0, 0]``; the count is floored at ``min_count`` (noisy G)."""
    return gram[..., 0, 1:] / np.maximum(gram[..., 0, 0], min_count)[..., None]


def subsystem_index(target: int, features: Sequence[int]) -> np.ndarray:
    """Rows/cols of G forming the (1, t[F], t[A]) system (attribute j is at index j + 1).

    ``G[idx][:, idx]`` is the augmented Gram of the ridge system of A on F, the input of
    :func:`~fediim.impute.iim.ridge_solve` and :func:`subsystem_sse`.
    """
    return np.array([0, *(int(feature) + 1 for feature in features), int(target) + 1],
                    dtype=np.intp)


def subsystem_sse(phi: np.ndarray, sub: np.ndarray) -> np.ndarray:
    """Sum of squared errors of model ``phi`` on the records behind ``sub``, a Gram
    restricted to (1, t[F], t[A]): ``y^T y - 2 phi^T V + phi^T U phi``, read off it alone."""
    size = sub.shape[-1] - 1
    lhs, rhs, target_square = sub[..., :size, :size], sub[..., :size, size], sub[..., size, size]
    return target_square - 2.0 * np.einsum("...i,...i->...", phi, rhs) + np.einsum(
        "...i,...ij,...j->...", phi, lhs, phi
    )


def augmented_upper_size(n_features: int) -> int:
    """Entries of the upper triangle (diagonal included) of an augmented Gram over
    ``n_features`` attributes: (m + 1)(m + 2) / 2."""
    return (n_features + 1) * (n_features + 2) // 2


def upper_triangle(gram: np.ndarray) -> np.ndarray:
    """The upper triangle (diagonal included) of each G, as vectors of length d(d+1)/2."""
    rows, columns = np.triu_indices(gram.shape[-1])
    return gram[..., rows, columns]


def from_upper_triangle(vec: np.ndarray, size: int) -> np.ndarray:
    """Symmetric matrices from upper-triangle vectors (inverse of :func:`upper_triangle`)."""
    vec = np.asarray(vec, dtype=np.float64)
    out = np.zeros((*vec.shape[:-1], size, size))
    rows, columns = np.triu_indices(size)
    out[..., rows, columns] = vec
    out[..., columns, rows] = vec
    return out


def project_psd(gram: np.ndarray) -> np.ndarray:
    """Symmetrise and project onto the PSD cone (negative eigenvalues set to zero).

    A noised Gram matrix can be indefinite; ridge systems and residuals read off it are only
    meaningful for a PSD matrix, and the projection is the nearest one in Frobenius norm.
    """
    symmetric = 0.5 * (gram + np.swapaxes(gram, -1, -2))
    eigenvalues, eigenvectors = np.linalg.eigh(symmetric)
    eigenvalues = np.maximum(eigenvalues, 0.0)
    return np.einsum("...ij,...j,...kj->...ik", eigenvectors, eigenvalues, eigenvectors)


def affine_map(center: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Matrix A with ``z_cell = A z_global`` for ``t_cell = (t_global - center) / width``.

    Stacked: ``center`` and ``width`` of shape (..., m) give A of shape (..., m+1, m+1).
    """
    center = np.asarray(center, dtype=np.float64)
    width = np.asarray(width, dtype=np.float64)
    n_features = center.shape[-1]
    matrix = np.zeros((*center.shape[:-1], n_features + 1, n_features + 1))
    matrix[..., 0, 0] = 1.0
    diagonal = np.arange(n_features) + 1
    matrix[..., diagonal, diagonal] = 1.0 / width
    matrix[..., 1:, 0] = -center / width
    return matrix


def transform_gram(gram: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``A G A^T``: the Gram matrix of the same records in coordinates ``z' = A z``."""
    return matrix @ gram @ np.swapaxes(matrix, -1, -2)
