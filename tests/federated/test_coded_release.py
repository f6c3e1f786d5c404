"""Coded columns in the federated release: the one-hot sensitivity on neighbouring
datasets, the noise scale charged for it, the refusal at budget, and FederatedIIM with
declared levels."""

from __future__ import annotations

import math

import numpy as np
import pytest

import fediim.federated.release as release_mod
from fediim import FederatedIIM
from fediim.federated import plan_privacy, site_release
from fediim.federated.release import coded_gram_sensitivity
from fediim.impute.encoding import ColumnCoding, MixedEncoding
from fediim.privacy import BudgetExceeded, PrivacyLedger, SeededGaussianNoise, gram_sensitivity
from tests.release_doubles import ReleaseRecorder

DELTA = 1e-6
#: age (numeric), chest pain (4 levels), smoker (binary), blood pressure (numeric)
ENCODING = MixedEncoding([ColumnCoding(), ColumnCoding("categorical", (1, 2, 3, 4)),
                          ColumnCoding("binary", (0, 1)), ColumnCoding()])
BOUNDS = np.array([[0.0, 100.0], [0.0, 3.0], [0.0, 1.0], [50.0, 250.0]])
M = 4  # table columns; the encoded table has 7


def _codes(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    age = rng.uniform(20, 90, n)
    pain = np.clip((age - 20) // 18 + rng.integers(-1, 2, n), 0, 3)
    return np.column_stack([age, pain, rng.integers(0, 2, n), 100 + age + rng.normal(0, 9, n)])


def _release(codes: np.ndarray, replay: list[np.ndarray] | None
             ) -> tuple[ReleaseRecorder, PrivacyLedger]:
    plan = plan_privacy(2.0, DELTA, M, max_depth=4, clip_fraction=0.0)
    ledger = PrivacyLedger.in_memory(plan.rho_total, "s")
    recorder = ReleaseRecorder(release_mod.release_gaussian, replay=replay)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(release_mod, "release_gaussian", recorder)
        site_release(ENCODING.encode(codes), ENCODING.encoded_bounds(BOUNDS), plan,
                     site_id="s", ledger=ledger, noise=SeededGaussianNoise(0),
                     clip_columns=ENCODING.encoded_flags(None),
                     onehot_blocks=ENCODING.onehot_blocks())
    return recorder, ledger


def test_one_hot_blocks_count_as_one_column_each() -> None:
    assert coded_gram_sensitivity(7, [[1, 2, 3, 4], [5]]) == gram_sensitivity(M)
    assert coded_gram_sensitivity(7, []) == gram_sensitivity(7)
    assert gram_sensitivity(M) < gram_sensitivity(7)  # codes expanded as plain numbers


@pytest.mark.parametrize(("record", "tight"), [
    ([100.0, 3, 1, 250.0], True),    # a corner of the numeric box, binary 1: tight
    ([0.0, 0, 0, 50.0], False),      # the opposite corner, binary 0 adds nothing
    ([55.5, 2, 1, 131.0], False),    # inside the box
])
def test_neighbouring_datasets_differ_by_at_most_the_coded_sensitivity(
        record: list[float], tight: bool) -> None:
    """One added record moves the pre-noise leaf-Gram vector by at most
    gram_sensitivity(m) of the table's m columns: the neighbour is cut by the same public
    tree (its released counts are replayed), and the one-hot columns stay in public
    coordinates inside every cell."""
    codes = _codes(300, 1)
    first, _ = _release(codes, replay=None)
    second, _ = _release(np.vstack([codes, record]), replay=first.released)
    before, after = first.exact[-1], second.exact[-1]
    assert before.shape == after.shape
    change = float(np.linalg.norm(after - before))
    sensitivity = gram_sensitivity(M)
    assert change <= sensitivity * (1 + 1e-12)
    if tight:
        assert change == pytest.approx(sensitivity)


def test_the_release_charges_the_coded_sensitivity_and_its_noise() -> None:
    recorder, ledger = _release(_codes(300, 2), replay=None)
    gram = ledger.entries[-1]
    plan = plan_privacy(2.0, DELTA, M, max_depth=4, clip_fraction=0.0)
    assert gram.mechanism == "gaussian" and "Gram" in gram.purpose
    assert gram.sensitivity_l2 == gram_sensitivity(M)
    assert gram.sigma == pytest.approx(gram_sensitivity(M) / math.sqrt(2 * plan.rho_gram))
    assert gram.sigma == pytest.approx(plan.sigma_gram)
    assert gram.dimension == recorder.exact[-1].size
    assert ledger.spent_rho == pytest.approx(plan.rho_total)


def test_a_release_beyond_the_budget_spends_nothing() -> None:
    plan = plan_privacy(2.0, DELTA, M, max_depth=4, clip_fraction=0.0)
    ledger = PrivacyLedger.in_memory(plan.rho_total * 0.99, "s")
    with pytest.raises(BudgetExceeded):
        site_release(ENCODING.encode(_codes(300, 3)), ENCODING.encoded_bounds(BOUNDS), plan,
                     site_id="s", ledger=ledger, onehot_blocks=ENCODING.onehot_blocks())
    assert ledger.spent_rho == 0 and not ledger.entries


def _sites(seed: int) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    truth = [_codes(n, seed + n) for n in (400, 300, 250)]
    rng = np.random.default_rng(seed)
    hidden = [np.column_stack([np.zeros(len(x), bool), rng.random(len(x)) < 0.15,
                               rng.random(len(x)) < 0.1, rng.random(len(x)) < 0.05])
              for x in truth]
    labels = [x.copy() for x in truth]
    for x in labels:
        x[:, 1] += 1  # chest pain labels 1..4
    masked = [np.where(mask, np.nan, x) for x, mask in zip(labels, hidden, strict=True)]
    return labels, masked, hidden


KINDS = {1: ("categorical", (1.0, 2.0, 3.0, 4.0)), 2: ("binary", (0.0, 1.0))}


def test_federated_fit_imputes_declared_levels_per_site() -> None:
    truth, masked, hidden = _sites(0)
    model = FederatedIIM(epsilon=4.0, bounds=BOUNDS, column_kinds=KINDS, seed=0,
                         clip_columns=[True, False, False, True],
                         aggregation="per-site").fit(masked)
    assert model.bank_.n_features == 7 and model.plan_.sigma_gram == pytest.approx(
        plan_privacy(4.0, DELTA, M).sigma_gram)
    assert model.bank_.meta.get("aggregation", "per-site") == "per-site"
    check_declared_levels(model, truth, masked, hidden)


def check_declared_levels(model: FederatedIIM, truth: list[np.ndarray],
                          masked: list[np.ndarray], hidden: list[np.ndarray]) -> None:
    """Every imputed coded cell a declared level with its probability, observed cells
    kept, and the chest-pain level well above chance."""
    for out, x, mask, result in zip(model.transform(masked), truth, hidden,
                                    model.impute(masked), strict=True):
        assert np.isin(out[mask[:, 1], 1], [1, 2, 3, 4]).all()
        assert np.isin(out[mask[:, 2], 2], [0, 1]).all()
        assert np.array_equal(out[~mask], x[~mask])
        assert np.all(result.probability[mask[:, 1], 1] >= 0.25)
    pooled = np.concatenate([out[m[:, 1], 1] == x[m[:, 1], 1] for out, x, m in
                             zip(model.transform(masked), truth, hidden, strict=True)])
    assert pooled.mean() > 0.5  # the level follows age: well above chance (0.25)


def test_federated_kinds_refuse_undeclared_levels() -> None:
    _, masked, _ = _sites(1)
    with pytest.raises(ValueError, match="declared levels"):
        FederatedIIM(epsilon=4.0, bounds=BOUNDS, column_kinds={1: "categorical"}).fit(masked)
    bad = [x.copy() for x in masked]
    bad[1][0, 1] = 7.0
    with pytest.raises(ValueError, match=r"site 1: column 'x1', row 1: 7.0 is not a declared"):
        FederatedIIM(epsilon=4.0, bounds=BOUNDS, column_kinds=KINDS).fit(bad)
