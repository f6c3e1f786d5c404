"""Vetting releases and banks against the plan: honest ones pass, crafted ones do not."""

from __future__ import annotations

from dataclasses import replace as dc_replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fediim.federated import ModelBank, assemble_bank, plan_privacy, site_release
from fediim.federated.release import cell_coordinates
from fediim.federated.vetting import ReleaseLimits, bank_problems, release_problems
from fediim.privacy import PrivacyLedger, SeededGaussianNoise

M = 3
BOUNDS = np.array([[0.0, 10.0], [-5.0, 5.0], [0.0, 100.0]])


def _site(seed: int, n: int = 400) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.uniform(1, 9, n)
    return np.column_stack([a, rng.normal(0, 1, n), 10 * a + rng.normal(0, 3, n)])


def _release(epsilon: float, seed: int = 0, site_id: str = "a") -> tuple[ModelBank, ReleaseLimits]:
    plan = plan_privacy(epsilon, 1e-6, M)
    ledger = PrivacyLedger.in_memory(plan.rho_total, site_id) if np.isfinite(epsilon) else None
    bank = site_release(_site(seed), BOUNDS, plan, site_id=site_id, ledger=ledger,
                        noise=SeededGaussianNoise(seed))
    return bank, ReleaseLimits.from_plan(plan, M)


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 4.0, np.inf])
def test_honest_releases_and_banks_pass(epsilon: float) -> None:
    releases = [_release(epsilon, seed, sid) for seed, sid in enumerate("abc")]
    limits = releases[0][1]
    for bank, _ in releases:
        assert bank.n_cells > 0
        assert release_problems(bank, limits) == []
    assert bank_problems(assemble_bank([b for b, _ in releases]), limits) == []


def _crafted(bank: ModelBank, **fields: np.ndarray | int) -> ModelBank:
    """A copy of ``bank`` with some fields replaced, bypassing the constructor's checks."""
    out = dc_replace(bank)
    for name, value in fields.items():
        object.__setattr__(out, name, value)
    return out


def _craft(bank: ModelBank, what: str) -> ModelBank:
    gram, lo, hi = bank.gram.copy(), bank.lo.copy(), bank.hi.copy()
    if what == "sigma zero":
        return _crafted(bank, sigma=np.zeros_like(bank.sigma))
    if what == "degenerate box":
        hi[0] = lo[0]
        return _crafted(bank, hi=hi)
    if what == "box outside bounds":
        lo[0, 0] = -3.0
        return _crafted(bank, lo=lo)
    if what == "nan":
        gram[0, 1, 1] = np.nan
        return _crafted(bank, gram=gram)
    if what == "huge count":
        gram[0, 0, 0] = 1e9
        return _crafted(bank, gram=gram)
    if what == "huge entry":
        gram[0, 1, 2] = gram[0, 2, 1] = 3.6e13
        return _crafted(bank, gram=gram)
    if what == "negative eigenvalue":
        gram[0, 1:, 1:] -= 5e3 * np.eye(M)
        return _crafted(bank, gram=gram)
    if what == "asymmetric":
        gram[0, 1, 2] += 1.0
        return _crafted(bank, gram=gram)
    if what == "min_records":
        return _crafted(bank, min_records=1)
    if what == "tree index":
        return _crafted(bank, tree=np.full(bank.n_cells, 7))
    raise AssertionError(what)


CRAFTS = ["sigma zero", "degenerate box", "box outside bounds", "nan", "huge count",
          "huge entry", "negative eigenvalue", "asymmetric", "min_records", "tree index"]


@pytest.mark.parametrize("what", CRAFTS)
def test_crafted_releases_are_rejected(what: str) -> None:
    bank, limits = _release(1.0)
    problems = release_problems(_craft(bank, what), limits)
    assert problems, what
    federation = _craft(assemble_bank([bank, _release(1.0, 1, "b")[0]]), what)
    assert any(p.startswith("cells of site 'a'") for p in bank_problems(federation, limits))


def test_a_bank_for_another_schema_width_is_rejected() -> None:
    bank, limits = _release(1.0)
    assert bank_problems(bank, dc_replace(limits, n_features=M + 1))
    assert release_problems(bank, dc_replace(limits, n_features=M + 1))


@given(st.integers(0, 2**32 - 1))
@settings(max_examples=200, deadline=None)
def test_cell_coordinates_stay_in_the_unit_box(seed: int) -> None:
    """Finding: (x - center) / width reached 0.5000000000000011, past the sensitivity."""
    rng = np.random.default_rng(seed)
    lo = rng.uniform(-0.5, 0.4, M)
    hi = np.minimum(lo + rng.uniform(1e-9, 1.0, M), 0.5)
    rows = rng.uniform(lo, hi, (50, M))
    rows[:2] = [lo, hi]  # the box's corners themselves
    z = cell_coordinates(rows, 0.5 * (lo + hi), hi - lo)
    assert np.all(np.abs(z) <= 0.5)
    assert np.linalg.norm(np.column_stack([np.ones(len(z)), z]), axis=1).max() <= np.sqrt(
        1 + M / 4)


def test_an_empty_release_with_another_min_records_is_rejected() -> None:
    """An empty release's manifest still carries min_records; the assembled bank takes the
    largest, so 10**8 would make it refuse every other site's cells."""
    bank, limits = _release(1.0)
    empty = bank.select(np.zeros(bank.n_cells, dtype=bool))
    assert release_problems(empty, limits) == []
    assert release_problems(_crafted(empty, min_records=10**8), limits) == [
        f"min_records {10**8}, the plan's is {limits.min_records}"]
