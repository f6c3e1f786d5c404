"""Tests for fediim.privacy: conversions, noise, ledger integrity, release, sensitivity."""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing
from pathlib import Path

import numpy as np
import opendp.prelude as dp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fediim.privacy import (
    LEDGER_FORMAT,
    BudgetExceeded,
    LedgerError,
    NoiseSource,
    OpenDPGaussianNoise,
    PrivacyLedger,
    SeededGaussianNoise,
    count_sensitivity,
    epsilon_to_rho,
    gaussian_sigma,
    gram_sensitivity,
    release_gaussian,
    rho_to_epsilon,
)
from fediim.privacy.ledger import _checksum
from tests.release_doubles import RecordingNoise

dp.enable_features("contrib")


def _space(n: int) -> tuple[object, object]:
    return dp.vector_domain(dp.atom_domain(T=float, nan=False), size=n), dp.l2_distance(T=float)


def _charge(ledger: PrivacyLedger, rho: float, purpose: str = "test") -> None:
    ledger.charge(
        mechanism="gaussian",
        sensitivity_l2=1.0,
        sigma=1.0 / math.sqrt(2 * rho),
        rho=rho,
        purpose=purpose,
        dimension=3,
        noise_source="recording-stub",
    )


def _rewrite_with_checksum(path: Path, doc: dict) -> None:
    payload = {k: v for k, v in doc.items() if k != "checksum"}
    doc["checksum"] = _checksum(payload)
    path.write_text(json.dumps(doc, indent=2))


# --------------------------------------------------------------------------- conversions


def test_rho_to_epsilon_matches_opendp_directly() -> None:
    meas = _space(4) >> dp.m.then_gaussian(scale=1.0)  # map(1) = 1/2 = rho
    assert meas.map(1.0) == pytest.approx(0.5, rel=1e-12)
    expected = dp.c.make_zCDP_to_approxDP(meas).map(1.0).epsilon(1e-6)
    got = rho_to_epsilon(0.5, 1e-6)
    assert got == pytest.approx(expected, rel=1e-9)
    assert got == pytest.approx(5.2215, abs=1e-3)
    assert got < 0.5 + 2 * math.sqrt(0.5 * math.log(1e6))  # tighter than textbook


def test_conversion_edge_cases() -> None:
    assert rho_to_epsilon(0.0, 1e-6) == 0.0
    assert rho_to_epsilon(math.inf, 1e-6) == math.inf
    assert epsilon_to_rho(math.inf, 1e-6) == math.inf
    assert epsilon_to_rho(0.0, 1e-6) >= 0.0
    big = rho_to_epsilon(1e6, 1e-6)  # OpenDP overflows here: classical bound fallback
    assert big == pytest.approx(1e6 + 2 * math.sqrt(1e6 * math.log(1e6)))
    for bad in (0.0, 1.0, -1e-6, math.nan):
        with pytest.raises(ValueError):
            rho_to_epsilon(0.5, bad)
    with pytest.raises(ValueError):
        rho_to_epsilon(-0.1, 1e-6)
    with pytest.raises(ValueError):
        epsilon_to_rho(-1.0, 1e-6)


@pytest.mark.parametrize(("eps", "delta"), [(0.3, 1e-5), (1.0, 1e-6), (8.0, 1e-9)])
def test_epsilon_rho_round_trip(eps: float, delta: float) -> None:
    rho = epsilon_to_rho(eps, delta)
    back = rho_to_epsilon(rho, delta)
    assert back <= eps
    assert back == pytest.approx(eps, rel=1e-6)
    assert rho_to_epsilon(rho * (1 + 1e-6), delta) > eps  # it is the largest such rho


@pytest.mark.parametrize(("sens", "rho"), [(1.0, 0.5), (2.25, 0.01), (0.3, 3.7), (6.0, 1e-4)])
def test_gaussian_sigma_matches_opendp_map(sens: float, rho: float) -> None:
    sigma = gaussian_sigma(sens, rho)
    assert sigma == pytest.approx(sens / math.sqrt(2 * rho))
    meas = _space(10) >> dp.m.then_gaussian(scale=sigma)
    assert meas.map(sens) == pytest.approx(rho, rel=1e-9)


def test_gaussian_sigma_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        gaussian_sigma(1.0, 0.0)
    with pytest.raises(ValueError):
        gaussian_sigma(-1.0, 0.5)


# --------------------------------------------------------------------------- noise


def test_opendp_noise_std() -> None:
    sigma = 2.5
    src = OpenDPGaussianNoise()
    assert isinstance(src, NoiseSource)
    x = src.sample((100, 200), sigma)  # one release of a 20,000-vector
    assert x.shape == (100, 200)
    assert abs(x.std() / sigma - 1) < 0.03
    assert abs(x.mean()) < 4 * sigma / math.sqrt(x.size)


def test_seeded_noise_std_and_reproducible() -> None:
    sigma = 0.7
    src = SeededGaussianNoise(123)
    assert isinstance(src, NoiseSource)
    assert "simulation only" in src.name and "not for deployment" in src.name
    x = src.sample((20_000,), sigma)
    assert abs(x.std() / sigma - 1) < 0.03
    a = SeededGaussianNoise(7).sample((5, 3), 1.0)
    b = SeededGaussianNoise(7).sample((5, 3), 1.0)
    c = SeededGaussianNoise(8).sample((5, 3), 1.0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# --------------------------------------------------------------------------- ledger


def test_ledger_charge_spent_remaining(tmp_path: Path) -> None:
    led = PrivacyLedger.create(tmp_path / "l.json", 1.0, "s1")
    assert (tmp_path / "l.json").exists()  # created immediately
    assert led.spent_rho == 0.0 and led.remaining_rho == 1.0
    _charge(led, 0.25, "counts")
    _charge(led, 0.5, "gram")
    assert led.spent_rho == pytest.approx(0.75)
    assert led.remaining_rho == pytest.approx(0.25)
    assert led.can_afford(0.25) and not led.can_afford(0.26)
    e = led.entries[-1]
    assert (e.purpose, e.rho, e.dimension, e.mechanism) == ("gram", 0.5, 3, "gaussian")
    assert e.time.endswith("+00:00")
    assert led.epsilon(1e-6) == pytest.approx(rho_to_epsilon(0.75, 1e-6))
    s = led.summary(1e-6)
    assert s["releases"] == 2 and s["rho_spent"] == pytest.approx(0.75)
    assert s["epsilon_budget"] == pytest.approx(rho_to_epsilon(1.0, 1e-6))


def test_in_memory_ledger() -> None:
    led = PrivacyLedger.in_memory(0.5, "sim")
    assert led.path is None
    _charge(led, 0.5)
    with pytest.raises(BudgetExceeded):
        _charge(led, 1e-6)
    assert len(led.entries) == 1


def test_restart_keeps_spend(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    led = PrivacyLedger.create(path, 2.0, "site-a")
    _charge(led, 0.3)
    _charge(led, 0.4)
    again = PrivacyLedger.open(path, 2.0, "site-a")
    assert again.spent_rho == pytest.approx(0.7)
    assert again.entries == led.entries
    _charge(again, 1.3)
    assert PrivacyLedger.open(path, 2.0, "site-a").remaining_rho == pytest.approx(0.0)


def test_exact_budget_allowed_tiny_over_refused() -> None:
    led = PrivacyLedger.in_memory(1.0, "s")
    for _ in range(4):
        _charge(led, 0.25)
    assert led.spent_rho == 1.0 and led.remaining_rho == 0.0
    with pytest.raises(BudgetExceeded):
        _charge(led, 1e-9)
    fresh = PrivacyLedger.in_memory(1.0, "s")
    with pytest.raises(BudgetExceeded):
        _charge(fresh, 1.0 + 1e-9)
    _charge(fresh, 1.0)


def test_refusal_leaves_file_identical_and_draws_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    led = PrivacyLedger.create(path, 1.0, "hospital-7")
    _charge(led, 0.9)
    before = path.read_bytes()
    stub = RecordingNoise()
    with pytest.raises(BudgetExceeded) as info:
        release_gaussian(
            np.ones((3, 3)), sensitivity_l2=1.0, rho=0.2, ledger=led, purpose="gram", noise=stub
        )
    msg = str(info.value)
    assert "hospital-7" in msg and "0.2" in msg and "0.9" in msg and "1" in msg
    assert stub.calls == 0
    assert path.read_bytes() == before
    assert len(led.entries) == 1
    assert PrivacyLedger.open(path, 1.0, "hospital-7").spent_rho == pytest.approx(0.9)


def test_tampered_rho_detected(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    _charge(PrivacyLedger.create(path, 1.0, "s"), 0.8)
    doc = json.loads(path.read_text())
    doc["entries"][0]["rho"] = 0.01  # pretend less was spent, checksum left as is
    path.write_text(json.dumps(doc, indent=2))
    with pytest.raises(LedgerError, match="checksum"):
        PrivacyLedger.open(path, 1.0, "s")
    # textual edit of the same kind
    _charge(PrivacyLedger.create(tmp_path / "b.json", 1.0, "s"), 0.5)
    text = (tmp_path / "b.json").read_text()
    assert '"rho": 0.5' in text
    (tmp_path / "b.json").write_text(text.replace('"rho": 0.5', '"rho": 0.05'))
    with pytest.raises(LedgerError, match=r"b\.json"):
        PrivacyLedger.open(tmp_path / "b.json", 1.0, "s")


_CONTENT_EDITS = {
    "negative rho": lambda d: d["entries"][0].__setitem__("rho", -0.5),
    "over budget": lambda d: d["entries"].append(dict(d["entries"][0], rho=0.6)),
    "zero budget": lambda d: d.__setitem__("rho_budget", 0.0),
    "dimension type": lambda d: d["entries"][0].__setitem__("dimension", "3"),
    "missing entry key": lambda d: d["entries"][0].pop("sigma"),
    "bad time": lambda d: d["entries"][0].__setitem__("time", "yesterday"),
    "assumption type": lambda d: d["entries"][0].__setitem__("assumption", 3),
    "unknown entry key": lambda d: d["entries"][0].__setitem__("assumptions", "t=3"),
}


@pytest.mark.parametrize("problem", sorted(_CONTENT_EDITS))
def test_invalid_content_with_valid_checksum_detected(tmp_path: Path, problem: str) -> None:
    path = tmp_path / "ledger.json"
    _charge(PrivacyLedger.create(path, 1.0, "s"), 0.5)
    doc = json.loads(path.read_text())
    _CONTENT_EDITS[problem](doc)
    _rewrite_with_checksum(path, doc)  # a "fixed-up" checksum does not launder bad content
    with pytest.raises(LedgerError, match="ledger.json"):
        PrivacyLedger.open(path, 1.0, "s")


def test_corrupt_files_detected(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    _charge(PrivacyLedger.create(path, 1.0, "s"), 0.5)
    good = path.read_text()
    doc = json.loads(good)
    variants = [
        good[: len(good) // 2],  # truncated
        "",  # empty
        "\x00\x01garbage{{",
        "[1, 2, 3]",
        json.dumps({k: v for k, v in doc.items() if k != "entries"}),  # missing key
        json.dumps(dict(doc, format="fediim-ledger/0")),
        good.replace('"rho": 0.5', '"rho": NaN'),
    ]
    for text in variants:
        path.write_text(text)
        with pytest.raises(LedgerError, match="ledger.json"):
            PrivacyLedger.open(path, 1.0, "s")
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(LedgerError):
        PrivacyLedger.open(path, 1.0, "s")
    assert doc["format"] == LEDGER_FORMAT


def test_site_or_budget_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    _charge(PrivacyLedger.create(path, 1.0, "site-a"), 0.5)
    before = path.read_bytes()
    with pytest.raises(LedgerError, match="site"):
        PrivacyLedger.open(path, 1.0, "site-b")
    with pytest.raises(LedgerError, match="rho_budget"):
        PrivacyLedger.open(path, 2.0, "site-a")
    assert path.read_bytes() == before


def test_open_never_creates_a_ledger(tmp_path: Path) -> None:
    """Finding 4: a missing ledger file is an error, never a fresh budget (open used to
    create one, so deleting the file or pointing elsewhere reset the spend to 0)."""
    with pytest.raises(LedgerError, match="does not exist"):
        PrivacyLedger.open(tmp_path / "l.json", 1.0, "s")
    assert not (tmp_path / "l.json").exists()
    with pytest.raises(LedgerError, match="does not exist"):
        PrivacyLedger.create(tmp_path / "nope" / "l.json", 1.0, "s")
    _charge(PrivacyLedger.create(tmp_path / "l.json", 1.0, "s"), 0.4)
    (tmp_path / "l.json").unlink()
    with pytest.raises(LedgerError, match="does not exist"):
        PrivacyLedger.open(tmp_path / "l.json", 1.0, "s")
    PrivacyLedger.create(tmp_path / "l.json", 1.0, "s")
    with pytest.raises(LedgerError, match="already exists"):
        PrivacyLedger.create(tmp_path / "l.json", 1.0, "s")


def test_two_handles_share_one_budget(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    a = PrivacyLedger.create(path, 1.0, "s")
    b = PrivacyLedger.open(path, 1.0, "s")
    _charge(a, 0.6)
    with pytest.raises(BudgetExceeded):
        _charge(b, 0.6)  # b sees a's charge: 1.2 > 1.0
    _charge(b, 0.3)
    assert PrivacyLedger.open(path, 1.0, "s").spent_rho == pytest.approx(0.9)
    assert len(a.entries) == 1 and len(b.entries) == 2


def _charge_many(path: str, n: int) -> None:
    ledger = PrivacyLedger.open(path, 1e6, "s")
    for _ in range(n):
        _charge(ledger, 1e-3)


def test_two_processes_charging_one_ledger_lose_nothing(tmp_path: Path) -> None:
    """Finding: a read-check-replace race lost half the charges of two processes."""
    path = tmp_path / "ledger.json"
    PrivacyLedger.create(path, 1e6, "s")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_charge_many, args=(str(path), 200)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(PrivacyLedger.open(path, 1e6, "s").entries) == 400


def test_a_deleted_or_rewound_ledger_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    led = PrivacyLedger.create(path, 1.0, "s")
    _charge(led, 0.2)
    _charge(led, 0.2)
    saved = path.read_bytes()
    path.unlink()
    with pytest.raises(LedgerError, match="gone"):
        _charge(led, 0.1)
    PrivacyLedger.create(path, 1.0, "s")  # an empty ledger in its place: spend rewound to 0
    with pytest.raises(LedgerError, match="rewound or replaced"):
        _charge(led, 0.1)
    path.write_bytes(saved)
    _charge(led, 0.1)
    assert led.spent_rho == pytest.approx(0.5)


# --------------------------------------------------------------------------- release


def test_release_gaussian_seeded(tmp_path: Path) -> None:
    led = PrivacyLedger.create(tmp_path / "l.json", 1.0, "s")
    values = np.arange(12, dtype=float).reshape(3, 4)
    out = release_gaussian(
        values,
        sensitivity_l2=2.0,
        rho=0.125,
        ledger=led,
        purpose="gram level 0",
        noise=SeededGaussianNoise(5),
    )
    sigma = gaussian_sigma(2.0, 0.125)
    expected = values + SeededGaussianNoise(5).sample((12,), sigma).reshape(3, 4)
    np.testing.assert_allclose(out, expected)
    (e,) = led.entries
    assert e.dimension == 12 and e.sigma == pytest.approx(sigma) and e.rho == pytest.approx(0.125)
    assert e.noise_source == SeededGaussianNoise.name and e.purpose == "gram level 0"


def test_release_gaussian_opendp_default() -> None:
    led = PrivacyLedger.in_memory(1.0, "s")
    values = np.full((6, 6), 100.0)
    out = release_gaussian(values, sensitivity_l2=1.0, rho=0.5, ledger=led, purpose="g")
    assert out.shape == (6, 6) and out.dtype == np.float64
    assert np.all(np.abs(out - 100.0) < 8.0)  # sigma = 1
    assert not np.array_equal(out, values)
    assert led.entries[0].noise_source == OpenDPGaussianNoise.name
    assert led.spent_rho == pytest.approx(0.5)


def test_release_gaussian_rejects_nonfinite() -> None:
    led = PrivacyLedger.in_memory(1.0, "s")
    stub = RecordingNoise()
    for bad in (np.array([1.0, np.nan]), np.array([np.inf]), np.array([])):
        with pytest.raises(ValueError):
            release_gaussian(bad, sensitivity_l2=1.0, rho=0.1, ledger=led, purpose="x", noise=stub)
    assert stub.calls == 0 and led.spent_rho == 0.0


# --------------------------------------------------------------------------- sensitivity


def _upper_l2(g: np.ndarray) -> float:
    return float(np.linalg.norm(g[np.triu_indices(g.shape[0])]))


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=0, max_value=15).flatmap(
        lambda m: st.lists(
            st.floats(min_value=-0.5, max_value=0.5, allow_nan=False), min_size=m, max_size=m
        )
    )
)
def test_gram_sensitivity_bound(t: list[float]) -> None:
    m = len(t)
    z = np.array([1.0, *t])
    g = np.outer(z, z)
    frob = float(np.linalg.norm(g))
    assert frob <= (1 + m / 4) * (1 + 1e-12)  # DESIGN's Frobenius bound
    assert _upper_l2(g) <= gram_sensitivity(m) * (1 + 1e-12)  # what is released
    assert gram_sensitivity(m) <= 1 + m / 4


@pytest.mark.parametrize("m", [0, 1, 2, 5, 8])
def test_gram_sensitivity_tight_at_corners(m: int) -> None:
    for corner in itertools.product((-0.5, 0.5), repeat=m):
        g = np.outer(np.array([1.0, *corner]), np.array([1.0, *corner]))
        assert float(np.linalg.norm(g)) == pytest.approx(1 + m / 4)
        assert _upper_l2(g) == pytest.approx(gram_sensitivity(m))
    assert count_sensitivity() == 1.0
    with pytest.raises(ValueError):
        gram_sensitivity(-1)
