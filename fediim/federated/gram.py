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

from fediim.impute.iim import ridge_solve

__all__ = [
    "augmented_gram",
    "gram_count",
    "gram_centroid",
    "subsystem_index",
    "ridge_from_gram",
    "residual_sse",
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
    z = np.column_stack([np.ones(len(values)), values])
    return z.T @ z


def gram_count(g: np.ndarray) -> np.ndarray:
    """Number of records (noisy if G is)."""
    return g[..., 0, 0]


def gram_centroid(g: np.ndarray, min_count: float = 1.0) -> np.ndarray:
    """Centroid ``G[0, 1:] / G[0, 0]``; the count is floored at ``min_count`` (noisy G)."""
    return g[..., 0, 1:] / np.maximum(g[..., 0, 0], min_count)[..., None]


def subsystem_index(target: int, features: Sequence[int]) -> np.ndarray:
    """Rows/cols of G forming the (1, t[F], t[A]) system (attribute j is at index j + 1)."""
    return np.array([0, *(int(f) + 1 for f in features), int(target) + 1], dtype=np.intp)


def ridge_from_gram(
    g: np.ndarray, target: int, features: Sequence[int], alpha: float | np.ndarray
) -> np.ndarray:
    """Ridge model phi (intercept first) of A on F from G: ``(U + alpha I)^-1 V``.

    ``alpha`` may be an array broadcasting against the stack of G.
    """
    idx = subsystem_index(target, features)
    return ridge_solve(g[..., idx[:, None], idx[None, :]], alpha)


def residual_sse(
    phi: np.ndarray, g_other: np.ndarray, target: int, features: Sequence[int]
) -> np.ndarray:
    """Sum of squared errors of model ``phi`` on the records behind ``g_other``.

    ``sum (y - x phi)^2 = y^T y - 2 phi^T V' + phi^T U' phi``, read off G' alone.
    """
    idx = subsystem_index(target, features)
    return subsystem_sse(phi, g_other[..., idx[:, None], idx[None, :]])


def subsystem_sse(phi: np.ndarray, sub: np.ndarray) -> np.ndarray:
    """:func:`residual_sse` for a Gram already restricted to (1, t[F], t[A])."""
    p = sub.shape[-1] - 1
    u, v, yy = sub[..., :p, :p], sub[..., :p, p], sub[..., p, p]
    return yy - 2.0 * np.einsum("...i,...i->...", phi, v) + np.einsum(
        "...i,...ij,...j->...", phi, u, phi
    )


def upper_triangle(g: np.ndarray) -> np.ndarray:
    """The upper triangle (diagonal included) of each G, as vectors of length d(d+1)/2."""
    d = g.shape[-1]
    iu = np.triu_indices(d)
    return g[..., iu[0], iu[1]]


def from_upper_triangle(vec: np.ndarray, d: int) -> np.ndarray:
    """Symmetric matrices from upper-triangle vectors (inverse of :func:`upper_triangle`)."""
    vec = np.asarray(vec, dtype=np.float64)
    out = np.zeros((*vec.shape[:-1], d, d))
    iu = np.triu_indices(d)
    out[..., iu[0], iu[1]] = vec
    out[..., iu[1], iu[0]] = vec
    return out


def project_psd(g: np.ndarray) -> np.ndarray:
    """Symmetrise and project onto the PSD cone (negative eigenvalues set to zero).

    A noised Gram matrix can be indefinite; ridge systems and residuals read off it are only
    meaningful for a PSD matrix, and the projection is the nearest one in Frobenius norm.
    """
    sym = 0.5 * (g + np.swapaxes(g, -1, -2))
    w, v = np.linalg.eigh(sym)
    w = np.maximum(w, 0.0)
    return np.einsum("...ij,...j,...kj->...ik", v, w, v)


def affine_map(center: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Matrix A with ``z_cell = A z_global`` for ``t_cell = (t_global - center) / width``.

    Stacked: ``center`` and ``width`` of shape (..., m) give A of shape (..., m+1, m+1).
    """
    center = np.asarray(center, dtype=np.float64)
    width = np.asarray(width, dtype=np.float64)
    m = center.shape[-1]
    a = np.zeros((*center.shape[:-1], m + 1, m + 1))
    a[..., 0, 0] = 1.0
    idx = np.arange(m) + 1
    a[..., idx, idx] = 1.0 / width
    a[..., 1:, 0] = -center / width
    return a


def transform_gram(g: np.ndarray, a: np.ndarray) -> np.ndarray:
    """``A G A^T``: the Gram matrix of the same records in coordinates ``z' = A z``."""
    return a @ g @ np.swapaxes(a, -1, -2)
