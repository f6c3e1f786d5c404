"""A site that never measures an attribute still releases what it has: cells over its
measured attributes (zeros elsewhere, ``observed`` False), the plan's noise and charge,
read only by the patterns they cover; with under two measured attributes nothing is
released or spent."""

from __future__ import annotations

import numpy as np
import pytest

from fediim.federated.bank import BankConfig, ModelBank
from fediim.federated.engines import pattern_models
from fediim.federated.plan import plan_privacy
from fediim.federated.release import site_release
from fediim.federated.vetting import ReleaseLimits, release_problems
from fediim.privacy import PrivacyLedger, SeededGaussianNoise, gram_sensitivity

M = 4
DELTA = 1e-6
BOUNDS = np.array([[-10.0, 10.0]] * M)


def _site(n: int, seed: int, never: tuple[int, ...] = ()) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 1))
    x = 2.0 * z * np.array([1.0, 0.8, -0.6, 0.5]) + 0.5 * rng.normal(size=(n, M))
    x[:, list(never)] = np.nan
    x[rng.random(n) < 0.05, 0] = np.nan  # ordinary gaps as well
    return x


def _release(x: np.ndarray, site_id: str, epsilon: float = 2.0
             ) -> tuple[ModelBank, PrivacyLedger, object]:
    plan = plan_privacy(epsilon, DELTA, M, max_depth=3)
    ledger = PrivacyLedger.in_memory(plan.rho_total, site_id)
    bank = site_release(x, BOUNDS, plan, site_id=site_id, ledger=ledger,
                        noise=SeededGaussianNoise(1))
    return bank, ledger, plan


def test_a_site_without_one_attribute_releases_the_others_at_the_plans_noise() -> None:
    bank, ledger, plan = _release(_site(3000, 0, never=(3,)), "small")
    assert bank.n_cells > 0
    assert np.all(bank.observed[:, :3]) and not np.any(bank.observed[:, 3])
    assert np.all(bank.gram[:, 4, :] == 0) and np.all(bank.gram[:, :, 4] == 0)
    assert np.all(bank.lo[:, 3] == -0.5) and np.all(bank.hi[:, 3] == 0.5)
    # Its records complete on the measured attributes are all described.
    assert bank.counts.sum() == pytest.approx(np.sum(~np.isnan(_site(3000, 0)[:, 0])),
                                              rel=0.05)
    gram_entry = next(e for e in ledger.entries if "Gram" in e.purpose)
    assert gram_entry.sensitivity_l2 == gram_sensitivity(M)  # the schema's: an upper bound
    assert gram_entry.rho == pytest.approx(plan.rho_gram, rel=1e-9)
    assert np.allclose(bank.sigma, plan.sigma_gram)
    assert release_problems(bank, ReleaseLimits.from_plan(plan, M)) == []
    forged = ModelBank.from_bytes(bank.to_bytes())
    forged.gram[0, 4, 1] = forged.gram[0, 1, 4] = 3.0
    assert any("does not measure" in p
               for p in release_problems(forged, ReleaseLimits.from_plan(plan, M)))


def test_under_two_measured_attributes_nothing_is_released_or_spent() -> None:
    bank, ledger, _ = _release(_site(500, 0, never=(1, 2, 3)), "tiny")
    assert bank.n_cells == 0 and not ledger.entries and ledger.spent_rho == 0.0


def test_patterns_read_only_the_cells_that_measure_them() -> None:
    small, _, _ = _release(_site(3000, 0, never=(3,)), "small")
    full, _, _ = _release(_site(3000, 1), "full")
    bank = ModelBank.concat([small, full])
    # The federation's mean of attribute 3 comes from the site that measures it.
    mean, variance = bank.column_moments()
    only_full = full.column_moments()
    assert mean[3] == pytest.approx(only_full[0][3])
    assert variance[3] == pytest.approx(only_full[1][3])
    with_three = pattern_models(bank, 3, (0, 1), BankConfig())
    assert set(with_three.bank.site) == {"full"}
    without_three = pattern_models(bank, 2, (0, 1), BankConfig())
    assert set(without_three.bank.site) == {"small", "full"}
    only_small = ModelBank.concat([small])
    with pytest.raises(ValueError, match="measures every attribute"):
        pattern_models(only_small, 3, (0,), BankConfig())
