"""Tests for fediim.federated.gram: the augmented Gram matrix and everything read off it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fediim.federated.gram import (
    affine_map,
    augmented_gram,
    from_upper_triangle,
    gram_centroid,
    gram_count,
    project_psd,
    subsystem_index,
    subsystem_sse,
    transform_gram,
    upper_triangle,
)
from fediim.impute.iim import ridge_solve


def ridge_from_gram(gram: np.ndarray, target: int, feats: Sequence[int],
                    alpha: float | np.ndarray) -> np.ndarray:
    """Ridge of A on F read off G, the way the bank engines do: the subsystem, then solve."""
    idx = subsystem_index(target, feats)
    return ridge_solve(gram[..., idx[:, None], idx[None, :]], alpha)


def residual_sse(phi: np.ndarray, gram: np.ndarray, target: int, feats: Sequence[int]
                 ) -> np.ndarray:
    """Squared error of ``phi`` on the records behind ``gram``, read off it alone."""
    idx = subsystem_index(target, feats)
    return subsystem_sse(phi, gram[..., idx[:, None], idx[None, :]])


def _correlated(rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    """n rows of m attributes driven by one latent factor, plus noise."""
    z = rng.normal(size=(n, 1))
    load = rng.uniform(-2.0, 2.0, size=m)
    return z * load + 0.3 * rng.normal(size=(n, m)) + rng.uniform(-3, 3, size=m)


def _numpy_ridge(x: np.ndarray, target: int, feats: list[int], alpha: float) -> np.ndarray:
    """(X^T X + alpha I)^-1 X^T y with X = [1, x[F]] (intercept penalised, as in IIM)."""
    xx = np.column_stack([np.ones(len(x)), x[:, feats]])
    y = x[:, target]
    return np.linalg.solve(xx.T @ xx + alpha * np.eye(xx.shape[1]), xx.T @ y)


@st.composite
def _subsystem(draw: st.DrawFn) -> tuple[int, int, int, list[int], float]:
    m = draw(st.integers(2, 5))
    target = draw(st.integers(0, m - 1))
    others = [j for j in range(m) if j != target]
    feats = draw(st.lists(st.sampled_from(others), min_size=1, max_size=len(others),
                          unique=True))
    alpha = draw(st.sampled_from([0.0, 1e-3, 0.5, 10.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    return seed, m, target, feats, alpha


# --------------------------------------------------------------------------- basics


def test_augmented_gram_holds_count_sums_and_moments() -> None:
    rng = np.random.default_rng(0)
    x = _correlated(rng, 50, 3)
    g = augmented_gram(x)
    assert g.shape == (4, 4)
    np.testing.assert_allclose(g, g.T)
    assert gram_count(g) == 50
    np.testing.assert_allclose(g[0, 1:], x.sum(axis=0))
    np.testing.assert_allclose(g[1:, 1:], x.T @ x)
    np.testing.assert_allclose(gram_centroid(g), x.mean(axis=0))


def test_gram_of_disjoint_sets_adds_up() -> None:
    rng = np.random.default_rng(1)
    x = _correlated(rng, 80, 4)
    np.testing.assert_allclose(augmented_gram(x[:30]) + augmented_gram(x[30:]),
                               augmented_gram(x), rtol=1e-12, atol=1e-10)


def test_gram_centroid_floors_count_and_stacks() -> None:
    g = np.zeros((2, 3, 3))
    g[0, 0, 0], g[0, 0, 1:] = 4.0, [2.0, -4.0]
    g[1, 0, 0], g[1, 0, 1:] = 0.2, [1.0, 1.0]  # a noisy, tiny count: floored at 1
    np.testing.assert_allclose(gram_centroid(g), [[0.5, -1.0], [1.0, 1.0]])
    np.testing.assert_allclose(gram_count(g), [4.0, 0.2])


def test_subsystem_index() -> None:
    np.testing.assert_array_equal(subsystem_index(2, (0, 3)), [0, 1, 4, 3])


# --------------------------------------------------------------------------- ridge / SSE


@settings(max_examples=60, deadline=None)
@given(_subsystem())
def test_ridge_from_gram_equals_numpy_ridge(case: tuple[int, int, int, list[int], float]) -> None:
    seed, m, target, feats, alpha = case
    rng = np.random.default_rng(seed)
    x = _correlated(rng, int(rng.integers(30, 200)), m)
    phi = ridge_from_gram(augmented_gram(x), target, feats, alpha)
    expected = _numpy_ridge(x, target, feats, alpha)
    np.testing.assert_allclose(phi, expected, rtol=1e-7, atol=1e-9)


def test_ridge_from_gram_stacked_with_array_alpha() -> None:
    rng = np.random.default_rng(2)
    xs = [_correlated(rng, 60 + 10 * i, 4) for i in range(3)]
    g = np.stack([augmented_gram(x) for x in xs])
    alphas = np.array([0.0, 0.1, 5.0])
    phi = ridge_from_gram(g, 1, (0, 3), alphas)
    assert phi.shape == (3, 3)
    for i, x in enumerate(xs):
        np.testing.assert_allclose(phi[i], _numpy_ridge(x, 1, [0, 3], alphas[i]), rtol=1e-8)
    # A scalar alpha on a stack equals the per-matrix fits too.
    phi_s = ridge_from_gram(g, 1, (0, 3), 0.1)
    for i, x in enumerate(xs):
        np.testing.assert_allclose(phi_s[i], _numpy_ridge(x, 1, [0, 3], 0.1), rtol=1e-8)


def test_ridge_from_gram_on_an_exact_linear_relation() -> None:
    rng = np.random.default_rng(3)
    f = rng.uniform(-1, 1, size=(100, 2))
    y = 0.7 - 2.0 * f[:, 0] + 0.5 * f[:, 1]
    x = np.column_stack([f, y])
    np.testing.assert_allclose(ridge_from_gram(augmented_gram(x), 2, (0, 1), 0.0),
                               [0.7, -2.0, 0.5], atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(_subsystem())
def test_residual_sse_equals_direct_sse(case: tuple[int, int, int, list[int], float]) -> None:
    seed, m, target, feats, alpha = case
    rng = np.random.default_rng(seed)
    x = _correlated(rng, 150, m)
    train, other = x[:90], x[90:]
    phi = ridge_from_gram(augmented_gram(train), target, feats, alpha)
    xx = np.column_stack([np.ones(len(other)), other[:, feats]])
    direct = np.sum((other[:, target] - xx @ phi) ** 2)
    got = residual_sse(phi, augmented_gram(other), target, feats)
    assert got == pytest.approx(direct, rel=1e-7, abs=1e-8)
    # An arbitrary (not fitted) model too.
    phi2 = rng.normal(size=len(feats) + 1)
    direct2 = np.sum((other[:, target] - xx @ phi2) ** 2)
    assert residual_sse(phi2, augmented_gram(other), target, feats) == pytest.approx(
        direct2, rel=1e-7, abs=1e-8)


def test_residual_sse_stacked() -> None:
    rng = np.random.default_rng(4)
    xs = [_correlated(rng, 40, 3) for _ in range(4)]
    g = np.stack([augmented_gram(x) for x in xs])
    phi = rng.normal(size=(4, 3))
    got = residual_sse(phi, g, 2, (0, 1))
    for i, x in enumerate(xs):
        xx = np.column_stack([np.ones(len(x)), x[:, :2]])
        assert got[i] == pytest.approx(np.sum((x[:, 2] - xx @ phi[i]) ** 2), rel=1e-9)


# --------------------------------------------------------------------------- triangles


@pytest.mark.parametrize("d", [1, 2, 4, 6])
def test_upper_triangle_round_trip(d: int) -> None:
    rng = np.random.default_rng(d)
    a = rng.normal(size=(5, d, d))
    sym = a + np.swapaxes(a, -1, -2)
    vec = upper_triangle(sym)
    assert vec.shape == (5, d * (d + 1) // 2)
    np.testing.assert_array_equal(from_upper_triangle(vec, d), sym)
    v = rng.normal(size=(3, d * (d + 1) // 2))
    back = from_upper_triangle(v, d)
    np.testing.assert_array_equal(back, np.swapaxes(back, -1, -2))
    np.testing.assert_array_equal(upper_triangle(back), v)


def test_upper_triangle_l2_norm_is_at_most_frobenius() -> None:
    rng = np.random.default_rng(5)
    z = np.concatenate([[1.0], rng.uniform(-0.5, 0.5, size=4)])
    g = np.outer(z, z)
    assert np.linalg.norm(upper_triangle(g)) <= np.linalg.norm(g) + 1e-12
    assert np.linalg.norm(g) == pytest.approx(z @ z)


# --------------------------------------------------------------------------- PSD


@pytest.mark.parametrize("seed", range(5))
def test_project_psd_gives_symmetric_psd(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(3, 5, 5)) * 10  # not symmetric, indefinite
    p = project_psd(a)
    np.testing.assert_allclose(p, np.swapaxes(p, -1, -2), atol=1e-10)
    w = np.linalg.eigvalsh(p)
    assert np.all(w >= -1e-9 * np.abs(w).max())
    # Idempotent, and no farther from the symmetric part than any other PSD matrix tried.
    np.testing.assert_allclose(project_psd(p), p, atol=1e-9)
    sym = 0.5 * (a + np.swapaxes(a, -1, -2))
    for _ in range(20):
        b = rng.normal(size=(5, 5))
        other = b @ b.T
        assert np.linalg.norm(sym[0] - p[0]) <= np.linalg.norm(sym[0] - other) + 1e-9


def test_project_psd_leaves_psd_matrices_unchanged() -> None:
    rng = np.random.default_rng(6)
    x = _correlated(rng, 200, 4)
    g = augmented_gram(x)
    np.testing.assert_allclose(project_psd(g), g, rtol=1e-10, atol=1e-8)
    # Rank-deficient PSD (fewer records than dimensions) stays too.
    g_low = augmented_gram(x[:2])
    np.testing.assert_allclose(project_psd(g_low), g_low, atol=1e-10)
    assert np.array_equal(project_psd(np.zeros((3, 3))), np.zeros((3, 3)))


def test_project_psd_of_noised_gram_clips_negative_eigenvalues() -> None:
    g = np.diag([4.0, 1.0, -2.0])
    np.testing.assert_allclose(project_psd(g), np.diag([4.0, 1.0, 0.0]), atol=1e-12)


# --------------------------------------------------------------------------- affine maps


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_transform_gram_equals_gram_of_transformed_rows(m: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-0.5, 0.5, size=(50, m))
    center = rng.uniform(-0.5, 0.5, size=m)
    width = 2.0 ** rng.integers(-6, 1, size=m).astype(float)
    g = augmented_gram(x)
    a = affine_map(center, width)
    cell = transform_gram(g, a)
    np.testing.assert_allclose(cell, augmented_gram((x - center) / width), rtol=1e-9,
                               atol=1e-7)
    inv = affine_map(-center / width, 1.0 / width)
    np.testing.assert_allclose(inv @ a, np.eye(m + 1), atol=1e-9)
    np.testing.assert_allclose(transform_gram(cell, inv), g, rtol=1e-9, atol=1e-9)


def test_affine_map_stacked() -> None:
    rng = np.random.default_rng(7)
    xs = [rng.uniform(-0.5, 0.5, size=(20, 3)) for _ in range(4)]
    centers = rng.uniform(-0.3, 0.3, size=(4, 3))
    widths = rng.uniform(0.1, 1.0, size=(4, 3))
    a = affine_map(centers, widths)
    assert a.shape == (4, 4, 4)
    g = np.stack([augmented_gram(x) for x in xs])
    cell = transform_gram(g, a)
    for i, x in enumerate(xs):
        np.testing.assert_allclose(cell[i], augmented_gram((x - centers[i]) / widths[i]),
                                   rtol=1e-9, atol=1e-9)
    back = transform_gram(cell, affine_map(-centers / widths, 1.0 / widths))
    np.testing.assert_allclose(back, g, rtol=1e-9, atol=1e-9)
    # The count row/col 0,0 is invariant.
    np.testing.assert_array_equal(cell[:, 0, 0], g[:, 0, 0])


def test_ridge_predictions_are_invariant_to_cell_coordinates() -> None:
    """An OLS model fitted in cell coordinates and mapped back predicts the same values."""
    rng = np.random.default_rng(8)
    x = _correlated(rng, 120, 3) / 10
    center, width = np.array([0.1, -0.2, 0.05]), np.array([0.5, 0.25, 1.0])
    g_cell = transform_gram(augmented_gram(x), affine_map(center, width))
    phi_cell = ridge_from_gram(g_cell, 2, (0, 1), 0.0)
    phi = ridge_from_gram(augmented_gram(x), 2, (0, 1), 0.0)
    q = x[:5, :2]
    pred = np.column_stack([np.ones(5), q]) @ phi
    q_cell = (q - center[:2]) / width[:2]
    pred_cell = (np.column_stack([np.ones(5), q_cell]) @ phi_cell) * width[2] + center[2]
    np.testing.assert_allclose(pred_cell, pred, rtol=1e-8, atol=1e-10)
