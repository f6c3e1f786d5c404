"""Tests for the hybrid's bounded work at a large site (issue 17): one local model per job
from ``ONE_FOLD_TRAINING_ROWS`` training rows on, one fold for the bank side, and one
neighbour search and pooling of the bank's cells for every noise multiplier."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import fediim.federated.engines as engines
import fediim.federated.site_imputation as federated
from fediim.federated import FederatedIIM, scale_to_bounds, site_impute
from fediim.federated.bank import NOISE_ALPHA_GRID, BankConfig, ModelBank
from fediim.federated.engines import CellPatternModels, pattern_models
from tests.federated.spies import spy_bank_counts

LOADINGS = np.array([1.0, 2.0, -1.0, 0.5])
BOUNDS = np.array([[-4.0, 4.0], [-8.0, 8.0], [-4.0, 4.0], [-2.0, 2.0]])
#: Training rows of the test site (a job sees a few fewer): "large" when the threshold
#: is lowered below it.
N_ROWS = 900


def _table(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 1)) * LOADINGS + 0.2 * rng.normal(size=(n, 4))


def _site_and_bank() -> tuple[np.ndarray, ModelBank]:
    """A site of ``N_ROWS`` rows, 1% of them missing the last attribute, and a noised bank
    of it and one other site."""
    x = _table(0, N_ROWS)
    x[::100, 3] = np.nan
    bank = FederatedIIM(epsilon=4.0, bounds=BOUNDS, seed=0).fit(
        [x, _table(1, 600)], site_ids=["s", "other"]).bank_
    return x, bank


def _count_local_fits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the training rows of every local IIM model site imputation fits."""
    fits: list[int] = []
    real = federated.PatternModels

    def spy(features: np.ndarray, *args: Any) -> Any:
        fits.append(len(features))
        return real(features, *args)

    monkeypatch.setattr(federated, "PatternModels", spy)
    return fits


def test_large_site_fits_its_local_model_once_per_job(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the threshold, one local model per job, without the validation rows, serves
    the cross-fitting and the imputation of the job's rows; below it, one per fold and one
    over every training row."""
    x, bank = _site_and_bank()
    fits = _count_local_fits(monkeypatch)
    small = site_impute(x, bank, BOUNDS, mode="hybrid", site_id="s", n_validation=40)
    n_train = N_ROWS - 9  # the job's training rows: those that observe the target
    assert fits == [n_train - 8] * federated.CROSSFIT_FOLDS + [n_train]
    fits.clear()
    monkeypatch.setattr(federated, "ONE_FOLD_TRAINING_ROWS", 500)
    large = site_impute(x, bank, BOUNDS, mode="hybrid", site_id="s", n_validation=40)
    assert fits == [n_train - 40]
    assert np.all(np.isfinite(large.values))
    np.testing.assert_allclose(large.values, small.values, atol=0.5)


def test_large_site_takes_its_validation_rows_out_of_the_bank_in_one_fold(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One bank without every validation row, read once for all the noise multipliers
    (pattern_models called once); below the threshold, one per fold."""
    x, bank = _site_and_bank()
    scaled, _ = scale_to_bounds(x, BOUNDS)
    rows = scaled[np.flatnonzero(~np.isnan(x).any(axis=1))[:40]]
    configs = federated.bank_choices(BankConfig(), exact=False)
    assert len(configs) == len(NOISE_ALPHA_GRID)
    seen = spy_bank_counts(monkeypatch)
    folded = federated.crossfitted_bank_coefficients(bank, "s", rows, 3, (0, 1, 2), configs)
    assert len(seen) == federated.CROSSFIT_FOLDS
    seen.clear()
    once = federated.crossfitted_bank_coefficients(bank, "s", rows, 3, (0, 1, 2), configs,
                                                   n_folds=1)
    assert len(seen) == 1
    np.testing.assert_allclose((bank.counts - seen[0]).sum(), len(rows))
    assert once.shape == folded.shape and np.all(np.isfinite(once))


def test_crossfit_folds_switch_to_one_at_the_threshold() -> None:
    limit = federated.ONE_FOLD_TRAINING_ROWS
    assert federated.crossfit_folds(limit - 1, 400) == federated.CROSSFIT_FOLDS
    assert federated.crossfit_folds(limit - 1, 3) == 3
    assert federated.crossfit_folds(limit, 400) == 1


def test_noise_multipliers_share_one_pooling_and_change_nothing() -> None:
    """Models for several noise multipliers from one neighbour search and pooling equal
    those built one by one, and share the pooling itself."""
    _, bank = _site_and_bank()
    configs = [BankConfig(engine="cells", noise_alpha=value) for value in NOISE_ALPHA_GRID]
    queries, _ = scale_to_bounds(_table(2, 30), BOUNDS)
    shared = federated.models_per_config(bank, 3, (0, 1, 2), configs)
    assert all(isinstance(models, CellPatternModels) for models in shared)
    for models, config in zip(shared, configs, strict=True):
        alone = pattern_models(bank, 3, (0, 1, 2), config)
        np.testing.assert_array_equal(models.coefficients(queries[:, :3]),
                                      alone.coefficients(queries[:, :3]))
    assert len({id(models._pooling) for models in shared}) == 1  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="beyond penalties"):
        shared[0].with_penalties(BankConfig(engine="cells", n_neighbors=5))  # type: ignore[union-attr]


def test_pooling_is_the_same_in_blocks_and_ranks_each_cell_in_each_list(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Pooling a few cells at a time sums exactly what pooling all at once does, and the
    rank of a validation cell is its position in the model cell's neighbour list."""
    _, bank = _site_and_bank()
    config = BankConfig(engine="cells")
    whole = pattern_models(bank, 3, (0, 1, 2), config)._pooling  # type: ignore[union-attr]
    monkeypatch.setattr(engines, "_POOLING_BLOCK_FLOATS", 1)
    models = pattern_models(bank, 3, (0, 1, 2), config)
    assert isinstance(models, CellPatternModels)
    blocks = models._pooling
    for (gram, noise), (gram_blocks, noise_blocks) in zip(whole.pooled, blocks.pooled,
                                                          strict=True):
        np.testing.assert_array_equal(gram, gram_blocks)
        np.testing.assert_array_equal(noise, noise_blocks)
    _, neighbors = models._index.query(models._anchors, bank.n_cells)
    for model, validation, rank in zip(blocks.model_cell, blocks.validation_cell,
                                       blocks.rank, strict=True):
        assert neighbors[model, rank] == validation
