"""Tests for fediim.federated.bank and .engines: validation, serialisation, IIM over cells."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest

from fediim.federated import plan_privacy, scale_to_bounds, site_release
from fediim.federated.bank import BANK_FORMAT, BankConfig, BankError, ModelBank
from fediim.federated.engines import (
    CellPatternModels,
    MixturePatternModels,
    default_cell_grid,
    pattern_models,
    tied_covariance,
)
from fediim.federated.gram import augmented_gram
from fediim.privacy import PrivacyLedger, SeededGaussianNoise

M = 4
BOUNDS = np.array([[-4.0, 4.0], [-7.0, 7.0], [-4.0, 4.0], [-3.0, 3.0]])


def _data(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 1))
    return z * np.array([1.0, 2.0, -1.0, 0.5]) + 0.2 * rng.normal(size=(n, M))


def _bank(epsilon: float = np.inf, seed: int = 0, n: int = 600, site: str = "a") -> ModelBank:
    plan = plan_privacy(epsilon, 1e-6, M, min_records=10, max_depth=6, n_trees=1)
    ledger = None if np.isinf(epsilon) else PrivacyLedger.in_memory(plan.rho_total, site)
    return site_release(_data(seed, n), BOUNDS, plan, site_id=site, ledger=ledger,
                        noise=SeededGaussianNoise(seed))


def _arrays(bank: ModelBank) -> dict[str, np.ndarray]:
    return {k: getattr(bank, k) for k in ("site", "cell", "lo", "hi", "gram", "sigma")}


def _assert_same_bank(a: ModelBank, b: ModelBank) -> None:
    assert a.n_features == b.n_features
    assert a.min_records == b.min_records
    assert a.meta == b.meta
    for k, v in _arrays(a).items():
        w = getattr(b, k)
        assert v.shape == w.shape, k
        np.testing.assert_array_equal(v, w, err_msg=k)


# --------------------------------------------------------------------------- construction


def test_bank_from_site_release_reads_off_counts_and_anchors() -> None:
    bank = _bank()
    x = _data(0, 600)
    xs, _ = scale_to_bounds(x, BOUNDS)
    assert bank.n_cells > 1
    assert bank.counts.sum() == pytest.approx(600)
    np.testing.assert_allclose(bank.pooled_gram(), augmented_gram(xs), rtol=1e-9, atol=1e-8)
    np.testing.assert_allclose(bank.feature_scale(), xs.std(axis=0), rtol=1e-7)
    # Each anchor is its cell's centroid and lies inside the cell's box.
    assert np.all(bank.anchors >= bank.lo - 1e-12) and np.all(bank.anchors <= bank.hi + 1e-12)


def test_small_cell_raises_bank_error() -> None:
    bank = _bank()
    gram = bank.gram.copy()
    gram[0] *= (bank.min_records - 1) / gram[0, 0, 0]  # a cell of min_records - 1 records
    with pytest.raises(BankError, match="fewer than"):
        ModelBank(n_features=M, site=bank.site, cell=bank.cell, lo=bank.lo, hi=bank.hi,
                  gram=gram, sigma=bank.sigma, min_records=bank.min_records)
    # Exactly min_records is fine.
    gram[0] *= bank.min_records / gram[0, 0, 0]
    ModelBank(n_features=M, site=bank.site, cell=bank.cell, lo=bank.lo, hi=bank.hi,
              gram=gram, sigma=bank.sigma, min_records=bank.min_records)


def test_small_noisy_count_raises_bank_error() -> None:
    g = np.zeros((1, 3, 3))
    g[0, 0, 0] = 9.99
    with pytest.raises(BankError):
        ModelBank(n_features=2, site=np.array(["s"]), cell=np.array(["s:0"]),
                  lo=np.full((1, 2), -0.5), hi=np.full((1, 2), 0.5), gram=g,
                  sigma=np.ones(1), min_records=10)


@pytest.mark.parametrize("field", ["cell", "lo", "hi", "gram", "sigma"])
def test_wrong_shapes_raise_bank_error(field: str) -> None:
    arrays = _arrays(_bank())
    arrays[field] = arrays[field][:-1]
    with pytest.raises(BankError, match=field):
        ModelBank(n_features=M, min_records=10, **arrays)


def test_concat_merges_sites() -> None:
    a, b = _bank(seed=0, site="a"), _bank(seed=1, n=400, site="b")
    merged = ModelBank.concat([a, b], meta={"k": 1})
    assert merged.n_cells == a.n_cells + b.n_cells
    assert set(merged.site) == {"a", "b"}
    assert len(set(merged.cell)) == merged.n_cells
    np.testing.assert_allclose(merged.pooled_gram(), a.pooled_gram() + b.pooled_gram())
    assert merged.meta == {"k": 1}
    with pytest.raises(BankError):
        ModelBank.concat([])
    other = ModelBank(n_features=2, site=np.array([], str), cell=np.array([], str),
                      lo=np.zeros((0, 2)), hi=np.zeros((0, 2)), gram=np.zeros((0, 3, 3)),
                      sigma=np.zeros(0))
    with pytest.raises(BankError, match="features"):
        ModelBank.concat([a, other])


def test_default_cell_grid() -> None:
    g = default_cell_grid(100)
    assert g[0] == 1 and g[-1] == 100
    assert np.all(np.diff(g) > 0)
    assert list(default_cell_grid(1)) == [1]
    assert list(default_cell_grid(2)) == [1, 2]


# --------------------------------------------------------------------------- serialisation


@pytest.mark.parametrize("epsilon", [np.inf, 2.0])
def test_bytes_round_trip(epsilon: float) -> None:
    bank = _bank(epsilon)
    bank.meta = {"epsilon": "inf" if np.isinf(epsilon) else epsilon, "delta": 1e-6}
    back = ModelBank.from_bytes(bank.to_bytes())
    _assert_same_bank(bank, back)
    assert back.to_bytes() == bank.to_bytes()


def test_save_load_round_trip(tmp_path: Path) -> None:
    bank = ModelBank.concat([_bank(seed=0, site="a"), _bank(4.0, seed=1, site="b")],
                            meta={"note": "x"})
    path = tmp_path / "bank.npz"
    bank.save(path)
    _assert_same_bank(bank, ModelBank.load(path))
    # Saving again over the file replaces it atomically (no stray temp files).
    bank.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank.npz"]


def test_truncated_file_raises_bank_error(tmp_path: Path) -> None:
    data = _bank().to_bytes()
    path = tmp_path / "bank.npz"
    for cut in (0, 10, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(BankError, match=str(path.name)):
            ModelBank.load(path)


@pytest.mark.parametrize("garbage", [b"", b"garbage" * 50, b"PK\x03\x04" + b"\x00" * 40,
                                     json.dumps({"format": BANK_FORMAT}).encode()])
def test_garbage_raises_bank_error(garbage: bytes) -> None:
    with pytest.raises(BankError):
        ModelBank.from_bytes(garbage)


def _npz(manifest: str, bank: ModelBank, **override: np.ndarray) -> bytes:
    arrays = {**_arrays(bank), **override}
    buf = io.BytesIO()
    np.savez(buf, manifest=np.array(manifest), **arrays)
    return buf.getvalue()


def _manifest(bank: ModelBank, **changes: object) -> str:
    doc = {"format": BANK_FORMAT, "n_features": bank.n_features, "n_cells": bank.n_cells,
           "min_records": bank.min_records, "meta": {}}
    doc.update(changes)
    return json.dumps(doc)


@pytest.mark.parametrize("fmt", ["fediim-bank/2", "fediim-ledger/1", None, ""])
def test_wrong_format_raises_bank_error(fmt: str | None) -> None:
    bank = _bank()
    with pytest.raises(BankError, match="format"):
        ModelBank.from_bytes(_npz(_manifest(bank, format=fmt), bank))


def test_well_formed_handmade_npz_loads() -> None:
    bank = _bank()
    _assert_same_bank(bank, ModelBank.from_bytes(_npz(_manifest(bank), bank)))


def test_manifest_not_json_raises_bank_error() -> None:
    bank = _bank()
    with pytest.raises(BankError):
        ModelBank.from_bytes(_npz("not json {", bank))


def test_missing_array_raises_bank_error() -> None:
    bank = _bank()
    buf = io.BytesIO()
    arrays = _arrays(bank)
    del arrays["sigma"]
    np.savez(buf, manifest=np.array(_manifest(bank)), **arrays)
    with pytest.raises(BankError):
        ModelBank.from_bytes(buf.getvalue())


@pytest.mark.parametrize("field", ["gram", "lo", "sigma"])
def test_non_finite_numbers_raise_bank_error(field: str) -> None:
    bank = _bank()
    bad = getattr(bank, field).copy()
    bad.flat[1] = np.nan
    with pytest.raises(BankError, match="non-finite"):
        ModelBank.from_bytes(_npz(_manifest(bank), bank, **{field: bad}))


def test_pickled_object_arrays_are_refused() -> None:
    bank = _bank()
    buf = io.BytesIO()
    np.savez(buf, manifest=np.array(_manifest(bank)), **{**_arrays(bank),
             "site": bank.site.astype(object)})
    with pytest.raises(BankError):
        ModelBank.from_bytes(buf.getvalue())


def test_manifest_n_features_mismatch_raises_bank_error() -> None:
    bank = _bank()
    with pytest.raises(BankError, match="shape"):
        ModelBank.from_bytes(_npz(_manifest(bank, n_features=M + 1), bank))


@pytest.mark.parametrize("case", ["list", "missing_n_features", "missing_min_records",
                                  "n_features_str", "gram_str"])
def test_malformed_manifest_raises_bank_error(case: str) -> None:
    bank = _bank()
    doc = json.loads(_manifest(bank))
    override: dict[str, np.ndarray] = {}
    if case == "list":
        manifest = "[1, 2]"
    elif case == "missing_n_features":
        del doc["n_features"]
        manifest = json.dumps(doc)
    elif case == "missing_min_records":
        del doc["min_records"]
        manifest = json.dumps(doc)
    elif case == "n_features_str":
        doc["n_features"] = "four"
        manifest = json.dumps(doc)
    else:
        manifest = json.dumps(doc)
        override["gram"] = np.full(bank.gram.shape, "x")
    with pytest.raises(BankError):
        ModelBank.from_bytes(_npz(manifest, bank, **override))


# --------------------------------------------------------------------------- IIM over cells


def test_single_cell_bank_imputes_like_global_regression() -> None:
    """One exact cell: every anchor's model is the global ridge, i.e. (near) OLS."""
    x = _data(3, 500)
    plan = plan_privacy(np.inf, 1e-6, M, min_records=10, max_depth=0, n_trees=1)
    bank = site_release(x, BOUNDS, plan, site_id="a", ledger=None)
    assert bank.n_cells == 1
    xs, _ = scale_to_bounds(x, BOUNDS)
    feats = (0, 1, 3)
    res = CellPatternModels(bank, 2, feats, BankConfig()).impute(xs[:20, list(feats)])
    xx = np.column_stack([np.ones(len(xs)), xs[:, list(feats)]])
    beta = np.linalg.lstsq(xx, xs[:, 2], rcond=None)[0]
    expected = xx[:20] @ beta
    np.testing.assert_allclose(res.values, expected, rtol=1e-3, atol=1e-4)
    assert res.candidates.shape == (20, 1)


@pytest.mark.parametrize("epsilon", [np.inf, 4.0])
def test_cell_models_impute_finite_values_with_sensible_error(epsilon: float) -> None:
    bank = ModelBank.concat([_bank(epsilon, seed=0, site="a"), _bank(epsilon, 1, site="b")])
    test = _data(9, 200)
    ts, _ = scale_to_bounds(test, BOUNDS)
    feats = (0, 2, 3)
    cfg = BankConfig(n_neighbors=5)
    res = CellPatternModels(bank, 1, feats, cfg).impute(ts[:, list(feats)])
    k = min(cfg.n_neighbors, bank.n_cells)
    assert res.values.shape == (200,)
    assert res.candidates.shape == (200, k)
    assert np.all(np.isfinite(res.values)) and np.all(res.spread >= 0)
    np.testing.assert_allclose(res.weights.sum(axis=1), 1.0)
    assert np.all(np.isin(res.ell, default_cell_grid(bank.n_cells)))
    nrmse = np.sqrt(np.mean((res.values - ts[:, 1]) ** 2)) / ts[:, 1].std()
    assert nrmse < 0.5  # strongly correlated data: far better than the mean (1.0)


# --------------------------------------------------------------------------- mixture engine


def test_mixture_of_one_exact_cell_is_the_gaussian_conditional_mean() -> None:
    """One exact cell: E[y | x_F] of a Gaussian with the data's mean and covariance (shrunk
    by the tiny box prior) is the least-squares regression."""
    x = _data(3, 500)
    plan = plan_privacy(np.inf, 1e-6, M, min_records=10, max_depth=0, n_trees=1)
    bank = site_release(x, BOUNDS, plan, site_id="a", ledger=None)
    xs, _ = scale_to_bounds(x, BOUNDS)
    feats = (0, 1, 3)
    res = MixturePatternModels(bank, 2, feats, BankConfig(mixture_prior=1e-6)).impute(
        xs[:20, list(feats)])
    xx = np.column_stack([np.ones(len(xs)), xs[:, list(feats)]])
    beta = np.linalg.lstsq(xx, xs[:, 2], rcond=None)[0]
    np.testing.assert_allclose(res.values, xx[:20] @ beta, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.spread, 0.0, atol=1e-12)  # one component: no spread


def test_mixture_follows_the_cell_that_holds_the_query() -> None:
    """Two separated clusters with opposite slopes: each query is imputed from its own."""
    rng = np.random.default_rng(0)
    f1 = rng.uniform(-0.45, -0.3, 300)
    f2 = rng.uniform(0.3, 0.45, 300)
    a = np.column_stack([f1, 2 * (f1 + 0.375)])
    b = np.column_stack([f2, -2 * (f2 - 0.375)])
    bounds = np.array([[-0.5, 0.5], [-0.5, 0.5]])
    plan = plan_privacy(np.inf, 1e-6, 2, min_records=10, max_depth=2, n_trees=1)
    bank = ModelBank.concat([site_release(a, bounds, plan, site_id="a", ledger=None),
                             site_release(b, bounds, plan, site_id="b", ledger=None)])
    q = np.array([[-0.4], [0.4]])
    got = MixturePatternModels(bank, 1, (0,), BankConfig()).impute(q).values
    np.testing.assert_allclose(got, [2 * (-0.4 + 0.375), -2 * (0.4 - 0.375)], atol=1e-3)


def test_tied_covariance_keeps_one_shape_in_cell_coordinates() -> None:
    """Cells sharing a covariance shape in their own coordinates keep their covariances;
    cells whose shapes differ only by noise that averages out (count-weighted) all get the
    common shape, scaled to each box."""
    rng = np.random.default_rng(0)
    lo = rng.uniform(-0.5, 0.0, size=(3, 2))
    hi = lo + rng.uniform(0.05, 0.4, size=(3, 2))
    width = hi - lo
    scale = width[:, :, None] * width[:, None, :]
    shape = np.array([[1 / 12, 0.05], [0.05, 1 / 12]])
    counts = np.array([40.0, 20.0, 20.0])
    np.testing.assert_allclose(tied_covariance(shape * scale, counts, lo, hi), shape * scale)
    noise = np.array([[[0.0, 0.02], [0.02, 0.01]]]) * np.array([1.0, -1.0, -1.0])[:, None, None]
    got = tied_covariance((shape + noise) * scale, counts, lo, hi)
    np.testing.assert_allclose(got, shape * scale, atol=1e-12)


def test_tied_covariance_is_psd_and_used_only_for_noised_banks() -> None:
    """An indefinite mean shape is clipped to PSD; the mixture of an exact bank keeps each
    cell's own covariance, that of a noised bank the tied one."""
    lo, hi = np.zeros((2, 2)), np.ones((2, 2))
    indefinite = np.array([[[1.0, 2.0], [2.0, 1.0]]] * 2)
    assert np.linalg.eigvalsh(tied_covariance(indefinite, np.ones(2), lo, hi)).min() >= -1e-12
    exact = _bank(np.inf)
    noised = dataclasses.replace(exact, sigma=np.full(exact.n_cells, 1e-9))
    feats = (0, 1, 3)
    cell_slopes = [MixturePatternModels(bank, 2, feats, BankConfig())._beta
                   for bank in (exact, noised)]
    assert not np.allclose(cell_slopes[0], cell_slopes[0][:1])  # cells differ
    assert not np.allclose(cell_slopes[0], cell_slopes[1])  # the noised bank's are tied


def test_auto_engine_is_the_mixture_only_for_exact_banks() -> None:
    exact, noised = _bank(np.inf), _bank(4.0)
    assert isinstance(pattern_models(exact, 0, (1, 2), BankConfig()), MixturePatternModels)
    assert isinstance(pattern_models(noised, 0, (1, 2), BankConfig()), CellPatternModels)
    assert isinstance(pattern_models(exact, 0, (1, 2), BankConfig(engine="cells")),
                      CellPatternModels)
    with pytest.raises(ValueError, match="engine"):
        BankConfig(engine="forest")


def test_tree_field_round_trips_and_old_banks_load() -> None:
    bank = ModelBank.concat([_bank(), _bank()])
    bank = ModelBank(n_features=M, site=bank.site, cell=bank.cell, lo=bank.lo, hi=bank.hi,
                     gram=bank.gram, sigma=bank.sigma,
                     tree=np.repeat([0, 1], len(bank.site) // 2))
    back = ModelBank.from_bytes(bank.to_bytes())
    np.testing.assert_array_equal(back.tree, bank.tree)
    assert back.n_trees == 2
    # Two trees over the same records: the pooled statistic counts each record once.
    np.testing.assert_allclose(back.pooled_gram(), _bank().pooled_gram())
    # A bank written before trees existed (no 'tree' array) loads as one tree.
    buf = io.BytesIO()
    z = np.load(io.BytesIO(_bank().to_bytes()))
    np.savez(buf, **{k: z[k] for k in z.files if k != "tree"})
    assert ModelBank.from_bytes(buf.getvalue()).n_trees == 1


def test_cells_engine_reads_one_tree_of_a_several_tree_bank() -> None:
    one = _bank()
    two = ModelBank.concat([one, one])
    two = ModelBank(n_features=M, site=two.site, cell=two.cell, lo=two.lo, hi=two.hi,
                    gram=two.gram, sigma=two.sigma, tree=np.repeat([0, 1], one.n_cells))
    models = pattern_models(two, 0, (1, 2), BankConfig(engine="cells"))
    assert isinstance(models, CellPatternModels) and models.bank.n_cells == one.n_cells
