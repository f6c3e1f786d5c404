"""The first session's input riding with key sharing: summed exactly when every site that
advertised shared its keys, asked again over the sharers (the same input, masks differing
only with the non-sharer) when one did not, and refused out of its narrow window."""

from __future__ import annotations

import numpy as np
import pytest

from fediim.protocol.secure_sum import (
    MaskedInputRequest,
    SecureAggregationError,
    UnmaskRequest,
)
from fediim.protocol.secure_sum.masking import pair_mask_sum
from tests.protocol.secure_sum_parties import Parties, config, parties

LENGTH = 6


def _inputs(run: Parties) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {site: rng.integers(-900, 900, LENGTH) for site in run.config.sites}


def _early(run: Parties, inputs: dict[str, np.ndarray], sharers: tuple[str, ...]
           ) -> tuple[list, dict]:
    """Every site shares its keys and masks its first input; (bundles of ``sharers``, the
    masked inputs by site)."""
    request = run.coordinator.first_input_request(LENGTH)
    bundles, masked = [], {}
    for site_id, site in run.sites.items():
        bundle = site.share_keys(run.broadcast)
        masked[site_id] = site.masked_input(request, inputs[site_id])
        if site_id in sharers:
            bundles.append(bundle)
    return bundles, masked


def _unmask(run: Parties, request: UnmaskRequest, deliveries: dict) -> np.ndarray:
    replies = []
    for site_id in request.survivors:
        if site_id in deliveries:
            run.sites[site_id].receive_shares(deliveries[site_id])
        replies.append(run.sites[site_id].unmask(request))
    return run.coordinator.unmasked_sum(replies)


def test_early_inputs_sum_exactly_when_every_advertised_site_shared() -> None:
    run = parties(config(4, 3, (LENGTH, 5)))
    inputs = _inputs(run)
    bundles, masked = _early(run, inputs, run.config.sites)
    deliveries = run.coordinator.route_shares(bundles)
    assert run.coordinator.first_inputs_usable()
    request = run.coordinator.unmask_request(masked.values())
    assert request.survivors == run.config.sites and request.dropped == ()
    total = _unmask(run, request, deliveries)
    assert total.tolist() == np.sum(list(inputs.values()), axis=0).tolist()
    # the next session runs as usual, over the survivors
    nxt = run.coordinator.masked_input_request(5)
    second = [run.sites[s].masked_input(nxt, np.full(5, i)) for i, s in enumerate(nxt.participants)]
    assert _unmask(run, run.coordinator.unmask_request(second), {}).tolist() == [6] * 5


def test_a_site_that_did_not_share_makes_the_first_session_asked_again() -> None:
    run = parties(config(4, 3, (LENGTH, 5)))
    inputs = _inputs(run)
    sharers = run.config.sites[:3]
    bundles, early = _early(run, inputs, sharers)
    deliveries = run.coordinator.route_shares(bundles)
    assert not run.coordinator.first_inputs_usable()
    again = run.coordinator.masked_input_request(LENGTH)
    assert again.session == 0 and again.participants == sharers
    masked = {}
    for site_id in sharers:
        run.sites[site_id].receive_shares(deliveries[site_id])
        masked[site_id] = run.sites[site_id].masked_input(again, inputs[site_id])
    total = _unmask(run, run.coordinator.unmask_request(masked.values()), {})
    assert total.tolist() == np.sum([inputs[s] for s in sharers], axis=0).tolist()
    # the two masked vectors of one input differ only by its masks with the non-sharer
    site, gone = run.sites["site-0"], "site-3"
    with_gone = pair_mask_sum("site-0", site._s_keys[0],
                              {gone: run.broadcast.advertisements[3].s_publics[0]},
                              run_id=run.config.run_id, session=0, length=LENGTH)
    assert ((early["site-0"].vector - masked["site-0"].vector) == with_gone).all()


def test_the_first_input_is_refused_outside_its_window() -> None:
    run = parties(config(4, 3, (LENGTH, 5)))
    site = run.sites["site-0"]
    first = run.coordinator.first_input_request(LENGTH)
    with pytest.raises(SecureAggregationError, match="before the shares were delivered"):
        site.masked_input(first, np.zeros(LENGTH, np.int64))  # keys not shared yet
    site.share_keys(run.broadcast)
    fewer = MaskedInputRequest(run_id=first.run_id, session=0,
                               participants=first.participants[:3], length=LENGTH)
    later = MaskedInputRequest(run_id=first.run_id, session=1,
                               participants=first.participants, length=5)
    for request in (fewer, later):
        with pytest.raises(SecureAggregationError, match="before the shares were delivered"):
            site.masked_input(request, np.zeros(request.length, np.int64))
    site.masked_input(first, np.zeros(LENGTH, np.int64))
    with pytest.raises(SecureAggregationError, match="before the shares were delivered"):
        site.masked_input(first, np.zeros(LENGTH, np.int64))  # only once
    unmask = UnmaskRequest(run_id=first.run_id, session=0, survivors=first.participants,
                           dropped=())
    with pytest.raises(SecureAggregationError, match="before the shares were delivered"):
        site.unmask(unmask)


def test_an_unmask_naming_a_site_that_never_shared_is_refused() -> None:
    """After early inputs over U1, a coordinator that names the non-sharer survivor (or
    dropped) asks for secrets no one holds a share of: refused before revealing any."""
    run = parties(config(4, 3, (LENGTH, 5)))
    bundles, _ = _early(run, _inputs(run), run.config.sites[:3])
    deliveries = run.coordinator.route_shares(bundles)
    site = run.sites["site-0"]
    site.receive_shares(deliveries["site-0"])
    for survivors, dropped in ((run.config.sites, ()), (run.config.sites[:3], ("site-3",))):
        request = UnmaskRequest(run_id=run.config.run_id, session=0, survivors=survivors,
                                dropped=dropped)
        with pytest.raises(SecureAggregationError, match="did not share their keys"):
            site.unmask(request)
