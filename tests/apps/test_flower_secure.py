"""Secure aggregation through the real ServerApp and ClientApps in one process
(tests/flower_grid.py): the bank equals the in-process FederatedIIM's with the same seeds,
the first sum's inputs ride with key sharing (asked again, uncharged, when a site did not
share), a site that drops after key sharing is left out while t survive, fewer than t fail the
run, a crafted tree is refused before any spend on it, and the ledgers name the
distributed mechanism and its assumption."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, RecordDict

from fediim.errors import QuorumNotMet
from fediim.federated import FederatedIIM
from fediim.federated.bank import ModelBank
from fediim.io.table import read_csv
from fediim.privacy import PrivacyLedger, epsilon_to_rho
from fediim.protocol.messages import ARRAYS_RECORD, RUN_CONFIG_DEFAULTS
from tests.apps.test_flower_apps import BOUNDS, _federation, _run, _view
from tests.fake_clock import FakeClock

SIZES = (300, 200, 150, 120)
ROUNDS = ["advertise", "share_keys", "moments:unmask", "counts:masked_input",
          "counts:unmask", "grams:masked_input", "grams:unmask"]


def _entries(layout: object, site_id: str) -> tuple:
    site = next(s for s in layout.sites if s.site_id == site_id)
    return PrivacyLedger.open(site.ledger, epsilon_to_rho(4.0, 1e-6), site_id).entries


def test_secure_bank_equals_federated_iim_with_the_same_seeds(tmp_path: Path) -> None:
    layout = _federation(tmp_path, sizes=SIZES, seed=77, aggregation="auto")
    grid = _run(layout)
    view = _view(layout)
    assert view["status"] == "completed", view["error"]
    sites = sorted(layout.sites, key=lambda s: s.site_id)
    ids = [s.site_id for s in sites]
    fed = FederatedIIM(epsilon=4.0, delta=1e-6, bounds=np.array(BOUNDS), seed=77,
                       aggregation="secure").fit([read_csv(s.data).values for s in sites],
                                                 site_ids=ids)
    got = ModelBank.from_bytes((layout.coordinator_dir / "bank.npz").read_bytes())
    want = fed.bank_
    assert got.n_cells == want.n_cells > 0
    for name in ("site", "cell", "lo", "hi", "gram", "sigma", "tree", "clip_lo", "clip_hi"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    assert set(got.site.tolist()) == {"federation"}  # every cell a sum, none a site's
    assert got.meta == {**want.meta, "session_survivors": [ids] * 3}
    # federation.json: aggregation, S, t, every round's survivors; the rounds in order
    assert view["aggregation"] == "secure" and view["bank"]["sites"] == ["federation"]
    secure = view["secure"]
    assert (secure["sites"], secure["threshold"]) == (4, 3)
    assert [r["round"] for r in secure["rounds"]] == ROUNDS
    assert secure["rounds"][0]["in_handshake"]  # the keys came with the handshake replies
    assert all(r["survivors"] == ids for r in secure["rounds"])
    assert [s["inputs_round"] for s in secure["sessions"]] == [
        "share_keys", "counts:masked_input", "grams:masked_input"]
    assert [g for _, g in grid.delivered][4::4] == [f"secure:{r}" for r in ROUNDS[1:]] + [
        "impute"]
    for s, mem in zip(sites, fed.ledgers_, strict=True):
        disk = _entries(layout, s.site_id)
        assert [e.rho for e in disk] == pytest.approx([e.rho for e in mem.entries])
        assert len(disk) == 3 and all(
            e.mechanism == "distributed discrete gaussian"
            and "threshold 3" in e.assumption and "honest-but-curious" in e.assumption
            for e in disk)
        assert view["sites"][s.site_id]["receipt"]["rho_charged"] == pytest.approx(
            sum(e.rho for e in disk))
        assert (s.directory / "imputed.csv").exists()


def test_a_site_dropping_after_key_sharing_leaves_the_others_to_finish(tmp_path: Path) -> None:
    layout = _federation(tmp_path, sizes=SIZES, aggregation="secure")
    gone = sorted(layout.sites, key=lambda s: s.site_id)[-1].site_id  # node 104
    clock = FakeClock()
    _run(layout, clock, drop=lambda node, group: node == 104 and group not in (
        "handshake", "secure:advertise", "secure:share_keys"))
    view = _view(layout)
    assert view["status"] == "completed", view["error"]
    assert clock.now == RUN_CONFIG_DEFAULTS["release-timeout"]  # waited out once
    assert view["sites"][gone]["stages"]["secure:moments:unmask"]["code"] == "silent"
    assert not view["sites"][gone]["active"]
    rounds = {r["round"]: r["survivors"] for r in view["secure"]["rounds"]}
    assert gone in rounds["share_keys"] and gone not in rounds["moments:unmask"]
    first, *later = view["secure"]["sessions"]
    assert gone in first["survivors"] and len(first["survivors"]) == 4  # its input came early
    assert gone in later[0]["dropped"]  # its pairwise masks removed once, then gone
    assert all(len(s["survivors"]) == 3 for s in later)


def test_a_site_that_never_shares_its_keys_makes_the_first_sum_asked_again_uncharged(
        tmp_path: Path) -> None:
    """The first sum's inputs were masked with every advertised site; one did not share its
    keys, so they cannot be unmasked: the others mask the same inputs again over the sites
    that shared, and pay for them once."""
    layout = _federation(tmp_path, sizes=SIZES, seed=77, aggregation="secure")
    gone = sorted(layout.sites, key=lambda s: s.site_id)[-1].site_id  # node 104
    _run(layout, FakeClock(), drop=lambda node, group: node == 104 and group not in (
        "handshake", "secure:advertise"))
    view = _view(layout)
    assert view["status"] == "completed", view["error"]
    secure = view["secure"]
    assert [r["round"] for r in secure["rounds"]][:4] == [
        "advertise", "share_keys", "moments:masked_input", "moments:unmask"]
    assert secure["sessions"][0]["inputs_round"] == "moments:masked_input"
    assert all(gone not in s["survivors"] and len(s["survivors"]) == 3
               for s in secure["sessions"])
    for site in layout.sites:
        if site.site_id != gone:
            assert len(_entries(layout, site.site_id)) == 3  # one charge per sum


def test_fewer_than_t_survivors_fail_the_run(tmp_path: Path) -> None:
    layout = _federation(tmp_path, sizes=SIZES, aggregation="secure",
                         **{"secure-threshold": 4})
    with pytest.raises(QuorumNotMet, match="threshold t = 4"):
        _run(layout, drop=lambda node, group: node == 101 and group.endswith("unmask"))
    view = _view(layout)
    assert view["status"] == "failed" and "threshold" in view["error"]


def test_a_threshold_above_the_admitted_sites_is_refused_before_any_spend(
        tmp_path: Path) -> None:
    layout = _federation(tmp_path, sizes=SIZES, aggregation="secure",
                         **{"secure-threshold": 5})
    with pytest.raises(QuorumNotMet, match="secure-threshold 5 is above the 4 site"):
        _run(layout)
    assert all(_entries(layout, s.site_id) == () for s in layout.sites)


def _gap_in_the_tree(node: int, group: str, content: RecordDict) -> RecordDict:
    """The coordinator sends node 101 a tree with one leaf left out (its records there
    would go uncounted, and a crafted partition could isolate them)."""
    if node == 101 and group == "secure:grams:masked_input":
        arrays = content.array_records[ARRAYS_RECORD]
        state = json.loads(arrays["public_state"].numpy().tobytes())
        state["leaves"][0] = state["leaves"][0][1:]
        arrays["public_state"] = Array(np.frombuffer(
            json.dumps(state).encode(), dtype=np.uint8).copy())
    return content


def test_a_crafted_tree_is_refused_by_the_site_before_it_pays_for_it(tmp_path: Path) -> None:
    layout = _federation(tmp_path, sizes=SIZES, aggregation="secure")
    _run(layout, tamper=_gap_in_the_tree)
    view = _view(layout)
    first = sorted(s.site_id for s in layout.sites)[0]
    refused = view["sites"][first]["stages"]["secure:grams:masked_input"]
    assert refused["code"] == "secure_refused"
    assert [e.purpose.split(":")[0] for e in _entries(layout, first)] == [
        "secure sum 1", "secure sum 2"]  # nothing charged for the Gram sum
    assert view["status"] == "completed"  # the other three sum without it (t = 3)


def _other_spend(node: int, group: str, content: RecordDict) -> RecordDict:
    """The coordinator asks node 101 for another epsilon than at the handshake."""
    if node == 101 and group == "secure:share_keys":
        content.config_records["fediim.config"]["epsilon"] = 3.0
    return content


def test_a_secure_round_with_another_spend_than_the_handshake_is_refused(
        tmp_path: Path) -> None:
    layout = _federation(tmp_path, sizes=SIZES, aggregation="secure")
    _run(layout, tamper=_other_spend)
    view = _view(layout)
    first = sorted(s.site_id for s in layout.sites)[0]
    assert view["sites"][first]["stages"]["secure:share_keys"]["code"] == "secure_refused"
    assert _entries(layout, first) == ()
    assert view["status"] == "completed"
    assert view["secure"]["rounds"][1]["survivors"] == sorted(
        s.site_id for s in layout.sites)[1:]


def test_keys_for_another_threshold_than_the_handshakes_take_an_advertise_round(
        tmp_path: Path) -> None:
    """Four nodes connect, so the handshake asks keys for t = 3; one stays silent, so the
    three admitted sites sum with t = 2 and advertise fresh keys in a round of their own."""
    layout = _federation(tmp_path, sizes=SIZES, aggregation="secure")
    grid = _run(layout, drop=lambda node, group: node == 104 and group == "handshake")
    view = _view(layout)
    assert view["status"] == "completed", view["error"]
    assert view["secure"]["threshold"] == 2
    assert view["secure"]["rounds"][0] == {"round": "advertise",
                                           "survivors": ["sitea", "siteb", "sitec"]}
    assert {n for n, g in grid.delivered if g == "secure:advertise"} == {101, 102, 103}
    assert all("threshold 2" in e.assumption for e in _entries(layout, "sitea"))
