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


def test_exact_method_follows_the_dimension() -> None:
    assert nb.exact_method(nb.KDTREE_MAX_DIM) == "kdtree"
    assert nb.exact_method(nb.KDTREE_MAX_DIM + 1) == "blas"
    data = np.random.default_rng(0).normal(size=(50, nb.KDTREE_MAX_DIM + 1))
    assert NeighborIndex(data).method == "blas"
    assert NeighborIndex(data, "kdtree").method == "kdtree"
    with pytest.raises(ValueError, match="method"):
        NeighborIndex(data, "annoy")  # type: ignore[arg-type]


def test_large_tables_keep_the_kdtree_only_for_few_features() -> None:
    """Above LARGE_TABLE_ROWS (bounded validation) the benchmark had BLAS faster from 31
    features on, so the KD-tree's limit drops to KDTREE_MAX_DIM_LARGE there."""
    large, small = nb.LARGE_TABLE_ROWS + 1, nb.LARGE_TABLE_ROWS
    assert nb.exact_method(nb.KDTREE_MAX_DIM_LARGE, large) == "kdtree"
    assert nb.exact_method(nb.KDTREE_MAX_DIM_LARGE + 1, large) == "blas"
    assert nb.exact_method(nb.KDTREE_MAX_DIM, small) == "kdtree"
    assert nb.auto_method(large, 31, None) == "blas"
    assert nb.auto_method(small, 31, None) == "kdtree"
    assert nb.LARGE_TABLE_ROWS == iim.FULL_VALIDATION_ROWS


def test_auto_is_approximate_only_where_the_documented_rule_says() -> None:
    """hnsw needs faiss, APPROX_MIN_FEATURES, APPROX_MIN_ROWS and every row queried;
    each condition missed (or unknown queries) gives the exact method for the width."""
    rows, width = nb.APPROX_MIN_ROWS, nb.APPROX_MIN_FEATURES
    assert nb.auto_method(rows, width, rows, approximate=True) == "hnsw"
    assert nb.auto_method(10 * rows, 2 * width, 10 * rows, approximate=True) == "hnsw"
    exact = nb.exact_method(width)
    assert nb.auto_method(rows, width, rows, approximate=False) == exact
    assert nb.auto_method(rows, width - 1, rows, approximate=True) == nb.exact_method(width - 1)
    assert nb.auto_method(rows - 1, width, rows - 1, approximate=True) == exact
    assert nb.auto_method(rows, width, rows - 1, approximate=True) == exact
    assert nb.auto_method(rows, width, None, approximate=True) == exact
    # The golden set's shape (2,400 rows x 3 features per pattern) keeps its KD-tree.
    assert nb.auto_method(2400, 3, 2400) == "kdtree"
    installed = nb.approximate_available()
    assert nb.auto_method(rows, width, rows) == ("hnsw" if installed else exact)


def test_bounded_validation_takes_hnsw_only_in_the_measured_shapes() -> None:
    """Bounded validation (above LARGE_TABLE_ROWS): hnsw from APPROX_BOUNDED_MIN_FEATURES
    up to APPROX_MIN_FEATURES - 1 (BLAS tied at 63); exact without the flag, without
    faiss, below the width or at or below LARGE_TABLE_ROWS rows."""
    large, least = nb.LARGE_TABLE_ROWS + 1, nb.APPROX_BOUNDED_MIN_FEATURES

    def auto(rows: int, width: int, *, bounded: bool = True, approximate: bool = True) -> str:
        return nb.auto_method(rows, width, None, approximate=approximate, bounded=bounded)

    assert auto(large, least) == "hnsw"
    assert auto(100 * large, nb.APPROX_MIN_FEATURES - 1) == "hnsw"
    assert auto(large, nb.APPROX_MIN_FEATURES) == "blas"
    assert auto(large, least - 1) == nb.exact_method(least - 1, large) == "kdtree"
    assert auto(nb.LARGE_TABLE_ROWS, least) == nb.exact_method(least, nb.LARGE_TABLE_ROWS)
    assert auto(large, least, bounded=False) == "kdtree"
    assert auto(large, 31, approximate=False) == "blas"


def test_the_engine_flags_bounded_validation_to_its_index(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A pattern above FULL_VALIDATION_ROWS rows (here lowered to 100) asks its index for
    bounded validation, one at or below it says every row queries."""
    asked: list[tuple[int | None, bool]] = []

    class Recording(NeighborIndex):
        def __init__(self, data: np.ndarray, *args: object, n_queries: int | None = None,
                     bounded: bool = False, **kwargs: object) -> None:
            asked.append((n_queries, bounded))
            super().__init__(data, *args, n_queries=n_queries, bounded=bounded, **kwargs)

    monkeypatch.setattr(iim, "FULL_VALIDATION_ROWS", 100)
    monkeypatch.setattr(iim, "NeighborIndex", Recording)
    rng = np.random.default_rng(0)
    for rows in (101, 100):
        features = rng.normal(size=(rows, 3))
        PatternModels(features, features[:, 0], IIMConfig())
    assert asked == [(None, True), (100, False)]


def test_faiss_is_installed_where_the_tests_run() -> None:
    """The dev install carries the approx extra, so the hnsw tests here never skip."""
    assert nb.approximate_available()


def test_imputer_auto_builds_hnsw_only_with_full_validation(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Through IIMImputer: a pattern validating every row gets hnsw under a rule that
    admits its shape; the same shape validated on a bounded sample stays exact."""
    _, holes = _table(400)
    monkeypatch.setattr(nb, "APPROX_MIN_ROWS", 100)
    monkeypatch.setattr(nb, "APPROX_MIN_FEATURES", 3)
    imputer = IIMImputer().fit(holes)
    imputer.transform(holes)
    methods = {models._index.method for models in imputer._patterns.values() if models}
    assert methods == {"hnsw"}
    monkeypatch.setattr(iim, "FULL_VALIDATION_ROWS", 100)
    imputer = IIMImputer().fit(holes)
    imputer.transform(holes)
    methods = {models._index.method for models in imputer._patterns.values() if models}
    assert methods == {"kdtree"}


def _shallow_hnsw(monkeypatch: pytest.MonkeyPatch) -> None:
    """A search depth too small for a recall floor of 1."""
    monkeypatch.setattr(nb, "HNSW_START_DEPTH", 1)
    monkeypatch.setattr(nb, "HNSW_MAX_DEPTH", 1)
    monkeypatch.setattr(nb, "RECALL_FLOOR", 1.0)


def test_low_recall_falls_back_to_the_exact_search(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    data, queries = rng.normal(size=(2000, 30)), rng.normal(size=(30, 30))
    _shallow_hnsw(monkeypatch)
    monkeypatch.setattr(nb, "APPROX_MIN_ROWS", 100)
    monkeypatch.setattr(nb, "APPROX_MIN_FEATURES", 30)
    index = NeighborIndex(data, "auto", k_hint=10, n_queries=2000)
    assert index.method == nb.exact_method(30) and index.recall_at_build < 1.0
    with pytest.warns(RuntimeWarning, match="RECALL_FLOOR"):
        asked = NeighborIndex(data, "hnsw", k_hint=10)
    assert asked.method == nb.exact_method(30) and asked.recall_at_build < 1.0
    exact = NeighborIndex(data, "blas").query(queries, 10)
    for index_ in (index, asked):
        np.testing.assert_array_equal(index_.query(queries, 10)[1], exact[1])


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
    assert index.method == "hnsw"
    assert 1 < index.depth <= nb.HNSW_MAX_DEPTH and index.recall_at_build == 1.0


def test_hnsw_and_exact_impute_the_same_where_recall_is_one() -> None:
    x, holes = _table(300)
    exact = IIMImputer(neighbor_index="kdtree").fit(holes)
    approx = IIMImputer(neighbor_index="hnsw").fit(holes)
    exact_out, approx_out = exact.transform(holes), approx.transform(holes)
    indexes = [models._index for models in approx._patterns.values() if models]
    assert indexes and all(index.method == "hnsw" for index in indexes)
    assert all(index.recall_at_build == 1.0 for index in indexes)
    missing = np.isnan(holes)
    sd = x.std(axis=0)
    error = lambda out: np.sqrt(np.mean(((out - x) / sd)[missing] ** 2))  # noqa: E731
    assert error(approx_out) == pytest.approx(error(exact_out), rel=1e-9)


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
    models are the same (the exact rule charges each model independently); the values
    agree up to the rounding of BLAS kernels, which may differ with the batch's shape."""
    _, holes = _table(800, seed=4)
    whole = IIMImputer().fit(holes).impute(holes)
    monkeypatch.setattr(estimator_module, "IMPUTE_CHUNK_ROWS", 7)
    chunked = IIMImputer().fit(holes).impute(holes)
    np.testing.assert_allclose(chunked.values, whole.values, rtol=1e-12, atol=1e-12)
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
