"""The secure sum is exact: every in-bound input, every session, with sites dropping."""

from __future__ import annotations

import numpy as np
import pytest

from fediim.protocol.secure_sum import (
    Dropout,
    Phase,
    SecureAggregationError,
    SecureSumConfig,
    check_headroom,
    check_threshold,
    default_threshold,
    secure_sums,
)
from tests.protocol.secure_sum_parties import config, shared


def _inputs(cfg: SecureSumConfig, seed: int) -> dict[str, list[np.ndarray]]:
    """Random inputs, half of them at or near the per-site bound."""
    rng = np.random.default_rng(seed)
    bound = cfg.max_abs_per_site
    inputs: dict[str, list[np.ndarray]] = {}
    for site in cfg.sites:
        vectors = []
        for n in cfg.vector_lengths:
            near = bound - rng.integers(0, 3, n, dtype=np.int64)
            signs = rng.choice(np.array([-1, 1], dtype=np.int64), n)
            vectors.append(np.where(rng.random(n) < 0.5, signs * near,
                                    rng.integers(-bound, bound, n, endpoint=True)))
        inputs[site] = vectors
    return inputs


def _exact(inputs: dict[str, list[np.ndarray]], sites: tuple[str, ...], k: int) -> list[int]:
    """The integer sum in Python ints (no wrap possible)."""
    return [sum(int(inputs[s][k][i]) for s in sites) for i in range(len(inputs[sites[0]][k]))]


@pytest.mark.parametrize("n_sites", [2, 3, 5])
def test_unmasked_sum_equals_the_integer_sum(n_sites: int) -> None:
    bound = (2 ** 62 - 1) // n_sites
    cfg = config(n_sites, default_threshold(n_sites), (7, 1, 33), max_abs=bound)
    inputs = _inputs(cfg, n_sites)
    result = secure_sums(cfg, inputs)
    assert result.survivors == (cfg.sites,) * 3
    for k, total in enumerate(result.sums):
        assert total.dtype == np.int64
        assert total.tolist() == _exact(inputs, cfg.sites, k)


def test_a_drop_after_key_sharing_and_one_before_a_later_masked_input_keep_the_sum() -> None:
    """site-4 drops after sharing its keys (before any masked input); site-1, a survivor of
    session 0 (its self-mask seed revealed), drops before session 1's masked input, and
    site-2 after session 2's masked input (a survivor that never answers the unmask)."""
    cfg = config(6, 3, (9, 4, 5), max_abs=10 ** 12)
    inputs = _inputs(cfg, 7)
    dropouts = {"site-4": Dropout(Phase.MASKED_INPUT, 0),
                "site-1": Dropout(Phase.MASKED_INPUT, 1), "site-2": Dropout(Phase.UNMASK, 2)}
    result = secure_sums(cfg, inputs, dropouts=dropouts)
    assert result.survivors == (("site-0", "site-1", "site-2", "site-3", "site-5"),
                                ("site-0", "site-2", "site-3", "site-5"),
                                ("site-0", "site-2", "site-3", "site-5"))
    for k, total in enumerate(result.sums):
        assert total.tolist() == _exact(inputs, result.survivors[k], k)


def test_sites_dropping_before_advertising_or_sharing_are_left_out() -> None:
    cfg = config(5, 3, (4,))
    inputs = _inputs(cfg, 3)
    result = secure_sums(cfg, inputs, dropouts={"site-0": Dropout(Phase.ADVERTISE),
                                                "site-3": Dropout(Phase.SHARE_KEYS)})
    assert result.survivors == (("site-1", "site-2", "site-4"),)
    assert result.sums[0].tolist() == _exact(inputs, result.survivors[0], 0)


@pytest.mark.parametrize("dropouts", [
    {"site-0": Dropout(Phase.MASKED_INPUT, 1), "site-1": Dropout(Phase.MASKED_INPUT, 1)},
    {"site-2": Dropout(Phase.SHARE_KEYS), "site-3": Dropout(Phase.UNMASK, 0)},
], ids=["survivors", "unmask-replies"])
def test_fewer_than_t_survivors_is_a_refusal_without_a_partial_sum(
        dropouts: dict[str, Dropout]) -> None:
    cfg = config(4, 3, (3, 3))
    with pytest.raises(SecureAggregationError, match="fewer than the threshold t = 3"):
        secure_sums(cfg, _inputs(cfg, 1), dropouts=dropouts)


def test_overflow_is_impossible_at_the_bounds_extremes() -> None:
    """m = 2^60 - 1 allows at most 4 sites (4m < 2^62 <= 5m): all at +m, all at -m, and
    alternating, each sums exactly; one more site or one more unit is refused."""
    m = 2 ** 60 - 1
    check_headroom(m, 4)
    for n_sites, bound in ((5, m), (4, m + 1)):
        with pytest.raises(SecureAggregationError, match="no headroom"):
            check_headroom(bound, n_sites)
    with pytest.raises(SecureAggregationError, match="no headroom"):
        config(5, 3, (3,), max_abs=m)
    cfg = config(4, 3, (5, 5, 5), max_abs=m)
    full = np.full(5, m, dtype=np.int64)
    inputs = {site: [full, -full, full * (-1) ** i] for i, site in enumerate(cfg.sites)}
    sums = secure_sums(cfg, inputs).sums
    assert [s.tolist() for s in sums] == [[4 * m] * 5, [-4 * m] * 5, [0] * 5]


def test_a_site_refuses_to_mask_an_input_beyond_its_bound_or_of_the_wrong_shape() -> None:
    cfg = config(3, 2, (4,), max_abs=100)
    run = shared(cfg)
    site = run.sites["site-0"]
    request = run.coordinator.masked_input_request()
    for bad in (np.array([0, 0, 101, 0]), np.array([0, -101, 0, 0]), np.zeros(3, np.int64),
                np.zeros(4)):
        with pytest.raises(SecureAggregationError):
            site.masked_input(request, bad)
    assert site.masked_input(request, np.array([100, -100, 0, 1])).length == 4


def test_thresholds_are_validated_and_the_default_is_two_thirds() -> None:
    assert [default_threshold(n) for n in (2, 3, 4, 5, 6, 9)] == [2, 2, 3, 4, 4, 6]
    for threshold, n_sites in ((1, 3), (4, 3), (True, 3)):
        with pytest.raises(SecureAggregationError, match="threshold"):
            check_threshold(threshold, n_sites)
    with pytest.raises(SecureAggregationError, match="threshold"):
        config(3, 4)


def test_the_4_site_3_session_deployment_shape_runs() -> None:
    """The lead's deployment shape (vector lengths 256, 131071, 16384) sums exactly."""
    cfg = config(4, 3, (256, 131071, 16384), max_abs=2 ** 40)
    inputs = _inputs(cfg, 11)
    result = secure_sums(cfg, inputs, dropouts={"site-3": Dropout(Phase.MASKED_INPUT, 1)})
    for k, total in enumerate(result.sums):
        expected = sum(inputs[s][k] for s in result.survivors[k])  # no wrap: 3 * 2^40
        assert np.array_equal(total, expected)


def test_lengths_announced_with_each_request_sum_exactly() -> None:
    """A later sum's length may follow from an earlier sum: None in the configuration, the
    coordinator announces it with the session's request (and must announce one)."""
    cfg = config(4, 3, (None, None, 3), max_abs=50)
    rng = np.random.default_rng(3)
    inputs = {site: [rng.integers(-50, 51, n) for n in (7, 2, 3)] for site in cfg.sites}
    sums = secure_sums(cfg, inputs).sums
    assert [s.tolist() for s in sums] == [_exact(inputs, cfg.sites, k) for k in range(3)]
    run = shared(cfg)
    with pytest.raises(SecureAggregationError, match="announced"):
        run.coordinator.masked_input_request()
    request = run.coordinator.masked_input_request(5)
    with pytest.raises(SecureAggregationError, match="length 5"):
        run.sites["site-0"].masked_input(request, np.zeros(4, np.int64))
    declared = shared(config(3, 2, (4,)))
    with pytest.raises(SecureAggregationError, match="declared of length 4"):
        declared.coordinator.masked_input_request(5)


def test_a_site_state_restored_from_bytes_between_every_round_sums_exactly() -> None:
    """A ClientApp answers each message in a new process: each site's state goes through
    ``to_bytes`` / ``from_bytes`` between rounds, and the sums are still exact."""
    cfg = config(4, 3, (6, 5), max_abs=1000)
    run = shared(cfg)
    keys = {site: agg._identity for site, agg in run.sites.items()}
    registry = {site: key.public_key() for site, key in keys.items()}

    def reload() -> None:
        for site, agg in run.sites.items():
            run.sites[site] = type(agg).from_bytes(agg.to_bytes(), keys[site], registry)

    inputs = _inputs(cfg, 7)
    for k in range(cfg.n_sessions):
        reload()
        request = run.coordinator.masked_input_request()
        masked = [run.sites[s].masked_input(request, inputs[s][k]) for s in cfg.sites]
        reload()
        unmask = run.coordinator.unmask_request(masked)
        total = run.coordinator.unmasked_sum([run.sites[s].unmask(unmask) for s in cfg.sites])
        assert total.tolist() == _exact(inputs, cfg.sites, k)
    with pytest.raises(SecureAggregationError, match="unreadable"):
        type(run.sites["site-0"]).from_bytes(b"{}", keys["site-0"], registry)


def test_keys_advertised_for_every_registered_site_narrow_to_the_runs_sites() -> None:
    """Keys advertised before the run's sites are known (with the handshake, for every
    registered site) serve a run of some of them; narrowing after key sharing, to a set
    without the site, or beyond the advertised sites is refused."""
    from fediim.protocol.secure_sum import CoordinatorSecureAggregator, SiteSecureAggregator
    from tests.protocol.secure_sum_parties import parties

    wide = config(5, 3, (4,))
    run = parties(wide)
    keys = {site: agg._identity for site, agg in run.sites.items()}
    registry = {site: key.public_key() for site, key in keys.items()}
    narrow = config(4, 3, (4,))
    sites = {s: SiteSecureAggregator.from_bytes(run.sites[s].to_bytes(), keys[s], registry,
                                                narrow.sites) for s in narrow.sites}
    coordinator = CoordinatorSecureAggregator(narrow)
    broadcast = coordinator.broadcast_advertisements(
        [a for a in run.broadcast.advertisements if a.site_id in narrow.sites])
    deliveries = coordinator.route_shares([sites[s].share_keys(broadcast) for s in sites])
    for site, delivery in deliveries.items():
        sites[site].receive_shares(delivery)
    inputs = {s: np.arange(4) * (i + 1) for i, s in enumerate(narrow.sites)}
    request = coordinator.masked_input_request()
    unmask = coordinator.unmask_request([sites[s].masked_input(request, inputs[s])
                                         for s in sites])
    total = coordinator.unmasked_sum([sites[s].unmask(unmask) for s in sites])
    assert total.tolist() == (np.arange(4) * 10).tolist()
    for bad in (("site-1", "site-2", "site-3"), ("site-0", "site-1", "site-9")):
        with pytest.raises(SecureAggregationError, match="narrow"):
            SiteSecureAggregator.from_bytes(run.sites["site-0"].to_bytes(), keys["site-0"],
                                            registry, bad)
    with pytest.raises(SecureAggregationError, match="narrow"):
        SiteSecureAggregator.from_bytes(sites["site-0"].to_bytes(), keys["site-0"], registry,
                                        ("site-0", "site-1", "site-2"))
