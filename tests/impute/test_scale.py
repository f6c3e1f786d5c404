"""The engine at scale: the approximate neighbour index and its recall check, bounded
validation above FULL_VALIDATION_ROWS, chunked learning and imputation, the bounded
pattern cache. Speed itself is measured by benchmarks/speed.py, never here."""

from __future__ import annotations

import numpy as np
import pytest

import fediim.impute.estimator as estimator_module
import fediim.impute.iim as iim
import fediim.impute.neighbors as nb
from fediim import IIMImputer
from fediim.impute.iim import IIMConfig, PatternModels
from fediim.impute.neighbors import NeighborIndex


def _table(n: int, seed: int = 0, missing: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """A smooth 4-column table and a copy with one cell missing in ``missing`` of rows."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 2))
    x = np.column_stack([latent[:, 0], latent[:, 1], np.sin(latent[:, 0]) + latent[:, 1],
                         latent[:, 0] * latent[:, 1]]) + 0.05 * rng.normal(size=(n, 4))
    holes = x.copy()
    rows = rng.choice(n, int(missing * n), replace=False)
    holes[rows, rng.integers(0, 4, len(rows))] = np.nan
    return x, holes


def test_auto_method_is_exact_and_follows_the_dimension() -> None:
    assert nb.auto_method(10**6, 8) == "kdtree"
    assert nb.auto_method(10**6, nb.KDTREE_MAX_DIM + 1) == "blas"
    data = np.random.default_rng(0).normal(size=(50, 20))
    assert NeighborIndex(data).method == "blas"
    assert NeighborIndex(data, "kdtree").method == "kdtree"
    with pytest.raises(ValueError, match="method"):
        NeighborIndex(data, "annoy")  # type: ignore[arg-type]


def test_hnsw_meets_its_recall_floor_and_returns_exact_distances() -> None:
    rng = np.random.default_rng(1)
    data = rng.normal(size=(1500, 12))
    index = NeighborIndex(data, "hnsw", k_hint=10)
    assert index.recall(10) >= nb.RECALL_FLOOR
    queries = rng.normal(size=(40, 12))
    dist, idx = index.query(queries, 10)
    np.testing.assert_allclose(dist, np.linalg.norm(data[idx] - queries[:, None], axis=2))
    assert np.all(np.diff(dist, axis=1) >= 0)
    exact = NeighborIndex(data, "blas").query(queries, 10)[1]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx, exact, strict=True)])
    assert overlap >= 0.95


def test_hnsw_search_deepens_until_the_recall_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    """A floor the first depth misses makes the check double the depth."""
    data = np.random.default_rng(2).normal(size=(1000, 16))
    monkeypatch.setattr(nb, "HNSW_START_DEPTH", 1)
    monkeypatch.setattr(nb, "RECALL_FLOOR", 1.0)
    index = NeighborIndex(data, "hnsw", k_hint=20)
    assert index.depth > 1
    assert index.recall(20) == 1.0 or index.depth >= index.n


def test_imputer_takes_the_index_and_refuses_unknown_ones() -> None:
    x, holes = _table(300)
    exact = IIMImputer().fit_transform(holes)
    approx = IIMImputer(neighbor_index="hnsw").fit_transform(holes)
    missing = np.isnan(holes)
    sd = x.std(axis=0)
    error = lambda out: np.sqrt(np.mean(((out - x) / sd)[missing] ** 2))  # noqa: E731
    assert error(approx) <= 1.1 * error(exact)
    with pytest.raises(ValueError, match="neighbor_index"):
        IIMImputer(neighbor_index="lsh").fit(holes)  # type: ignore[arg-type]


def _bounded(monkeypatch: pytest.MonkeyPatch, full_rows: int = 100) -> None:
    monkeypatch.setattr(iim, "FULL_VALIDATION_ROWS", full_rows)


def test_bounded_validation_pairs_are_true_pairs_near_the_learned_rows(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the threshold a validation tuple is one of the learned rows' k nearest and
    its model is one of the tuple's own k nearest others, as in the exact rule."""
    x, _ = _table(2000)
    config = IIMConfig()
    exact = PatternModels(x[:, :3], x[:, 3], config)
    all_validated, all_models = exact._validation_pairs(np.arange(5), np.zeros((5, 0), int))
    _bounded(monkeypatch)
    models = PatternModels(x[:, :3], x[:, 3], config)
    rows = np.array([3, 70, 900])
    neighbors = models._index.query(models.features[rows], 200)[1]
    validated, model = models._validation_pairs(rows, neighbors)
    ranks = int(round(iim.VALIDATION_RANKS * config.n_neighbors)) + 1
    assert set(validated) == set(neighbors[:, 1:ranks].ravel())
    exact_pairs = set(zip(all_validated.tolist(), all_models.tolist(), strict=True))
    assert set(zip(validated.tolist(), model.tolist(), strict=True)) <= exact_pairs


def test_bounded_validation_stays_close_to_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    x, holes = _table(3000, seed=3)
    missing = np.isnan(holes)
    sd = x.std(axis=0)

    def error() -> float:
        out = IIMImputer().fit_transform(holes)
        return float(np.sqrt(np.mean(((out - x) / sd)[missing] ** 2)))

    exact = error()
    _bounded(monkeypatch)
    assert error() <= 1.05 * exact


def test_learning_in_chunks_matches_learning_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of learned rows only bound memory: with every row a validation tuple, the
    models are the same (the exact rule charges each model independently)."""
    _, holes = _table(800, seed=4)
    whole = IIMImputer().fit(holes).impute(holes)
    monkeypatch.setattr(estimator_module, "IMPUTE_CHUNK_ROWS", 7)
    chunked = IIMImputer().fit(holes).impute(holes)
    np.testing.assert_array_equal(chunked.values, whole.values)
    np.testing.assert_array_equal(chunked.ell, whole.ell)


def test_chosen_models_in_chunks_in_the_bounded_regime(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    """Above the threshold rows are learned LEARN_CHUNK_ROWS at a time; every requested
    row gets a model."""
    x, _ = _table(1500, seed=5)
    _bounded(monkeypatch)
    monkeypatch.setattr(iim, "LEARN_CHUNK_ROWS", 16)
    learned: list[int] = []
    models = PatternModels(x[:, :3], x[:, 3], IIMConfig())
    original = models._learn
    monkeypatch.setattr(models, "_learn", lambda rows: (learned.append(len(rows)),
                                                        original(rows)))
    rows = np.arange(0, 1500, 9)
    phi, _ = models.chosen_models(rows)
    assert max(learned) <= 16 and sum(learned) == len(rows)
    assert np.all(np.isfinite(phi))


def test_pattern_cache_keeps_at_most_its_row_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past PATTERN_CACHE_ROWS training rows the least recently used patterns go; the
    newest stays, and a dropped pattern is rebuilt to the same numbers."""
    _, holes = _table(400, seed=6)
    imputer = IIMImputer().fit(holes)
    first = imputer.transform(holes)
    monkeypatch.setattr(estimator_module, "PATTERN_CACHE_ROWS", 500)
    imputer = IIMImputer().fit(holes)
    again = imputer.transform(holes)
    kept = [models for models in imputer._patterns.values() if models is not None]
    assert 1 <= len(kept) and sum(models.n_rows for models in kept) <= max(
        500, max(models.n_rows for models in kept))
    np.testing.assert_array_equal(again, first)
    np.testing.assert_array_equal(imputer.transform(holes), first)
