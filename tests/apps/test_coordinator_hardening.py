"""The coordinator against misbehaving sites (review finding 6), with the real ServerApp and
ClientApps in one process (tests/flower_grid.py) and a fake clock: crafted releases are
vetted and excluded, site ids are bound to registered keys, and a rewound ledger is refused
thanks to the coordinator's spend receipts.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from coordinator.app import make_server_app
from coordinator.spend import SPEND_RECORD_NAME
from fediim.deploy.layout import FederationLayout, prepare_federation
from fediim.errors import ConfigError, QuorumNotMet, SignatureError, SigningKeyError
from fediim.federated.bank import ModelBank
from fediim.federated.vetting import ReleaseLimits, bank_problems
from fediim.privacy import PrivacyLedger, epsilon_to_rho
from fediim.protocol.identity import (
    load_site_private_key,
    load_site_public_key,
    load_site_registry,
    sign_handshake,
    site_key_id,
    site_registry_toml,
    verify_handshake,
)
from fediim.protocol.messages import ARRAYS_RECORD, CONFIG_RECORD, ReleaseReply
from fediim.protocol.receipts import read_receipts, receipts_path, verify_receipt
from fediim.protocol.run_config import RUN_CONFIG_DEFAULTS, RunConfig, privacy_plan
from fediim.protocol.signing import load_public_key, write_keypair
from fediim.protocol.tls import write_node_auth_keypair
from site_client.app import app as client_app
from tests.apps.test_flower_apps import (
    COLUMNS,
    RUN_ID,
    _schema,
    _table,
    _view,
    _write_csv,
)
from tests.fake_clock import FakeClock
from tests.flower_grid import InProcessGrid, run_server_app

Craft = Callable[[ModelBank], ModelBank]


def _layout(tmp_path: Path, sites: dict[str, int], *, min_sites: int = 2,
            budget_epsilon: float | None = None, **run: Any) -> FederationLayout:
    """A local federation whose site ids are the keys of ``sites`` (values: rows)."""
    data = []
    for index, (name, rows) in enumerate(sites.items()):
        path = tmp_path / "data" / f"{name}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_csv(path, _table(index, rows))
        data.append(path)
    return prepare_federation(data, _schema(tmp_path / "schema.toml"), tmp_path / "out",
                              epsilon=4.0, delta=1e-6, min_sites=min_sites,
                              budget_epsilon=budget_epsilon,
                              run_config={"aggregation": "per-site", **run})


def _nodes(layout: FederationLayout) -> dict[int, dict[str, Any]]:
    return {101 + i: {"site-config": str(s.config)} for i, s in enumerate(layout.sites)}


def _serve(layout: FederationLayout, nodes: dict[int, dict[str, Any]] | None = None,
           app: ClientApp = client_app, **grid_kwargs: Any) -> InProcessGrid:
    grid = InProcessGrid(app, nodes or _nodes(layout), run_id=grid_kwargs.pop("run_id", RUN_ID),
                         run_config={**RUN_CONFIG_DEFAULTS, **layout.run_config}, **grid_kwargs)
    run_server_app(make_server_app(FakeClock()), grid)
    return grid


def _stage(view: dict[str, Any], name: str, stage: str) -> dict[str, Any]:
    return view["sites"][name]["stages"][stage]


# -- crafted releases -------------------------------------------------------------------------


def _crafting_app(crafts: dict[str, Craft]) -> ClientApp:
    """The real ClientApp, except that the sites named in ``crafts`` rewrite their release."""
    app = ClientApp()

    @app.query()
    def _query(msg: Message, context: Context) -> Message:
        reply = client_app(msg, context)
        config = reply.content.config_records[CONFIG_RECORD]
        craft = crafts.get(str(config["site_id"]))
        if craft is None or config["stage"] != "release" or config["code"] != "ok":
            return reply
        honest = ReleaseReply.from_record(reply.content)
        assert honest.bank is not None
        bank = craft(ModelBank.from_bytes(honest.bank))
        crafted = ReleaseReply(site_id=honest.site_id, bank=bank.to_bytes(),
                               n_cells=bank.n_cells, ledger=honest.ledger)
        return Message(crafted.to_record(), reply_to=msg)

    return app


def _huge_gram(bank: ModelBank) -> ModelBank:
    """Every Gram entry 1e9 times larger, except the counts (|G| ~ 1e10)."""
    gram = bank.gram * 1e9
    gram[:, 0, 0] = bank.counts
    return dataclasses.replace(bank, gram=gram)


def _negative_eigenvalue(bank: ModelBank) -> ModelBank:
    gram = bank.gram.copy()
    gram[:, 1, 1] -= 5e3
    return dataclasses.replace(bank, gram=gram)


def _claimed_count(bank: ModelBank) -> ModelBank:
    gram = bank.gram.copy()
    gram[:, 0, 0] = 1e9
    return dataclasses.replace(bank, gram=gram)


def _min_records(cells: bool) -> Craft:
    """A manifest claiming min_records = 10**8, with the site's cells or with none."""
    def craft(bank: ModelBank) -> ModelBank:
        crafted = bank if cells else bank.select(np.zeros(bank.n_cells, dtype=bool))
        crafted.min_records = 10**8  # past the constructor's check, as a crafted file is
        return crafted
    return craft


CRAFTS: dict[str, tuple[Craft, str]] = {
    "huge-gram": (_huge_gram, "Gram entries larger than records inside the bounds can produce"),
    "negative-eigenvalue": (_negative_eigenvalue, "not positive semi-definite"),
    "claimed-count": (_claimed_count, "a cell count outside"),
    "box-outside": (lambda bank: dataclasses.replace(bank, lo=bank.lo - 1.0),
                    "a cell box outside the public bounds"),
    "zero-sigma": (lambda bank: dataclasses.replace(bank, sigma=np.zeros_like(bank.sigma)),
                   "cells released with noise other than the plan's"),
}


def _assert_honest_run(layout: FederationLayout, honest: list[str]) -> None:
    """The run completed, and its bank holds exactly the honest sites' cells, all fit."""
    view = _view(layout)
    assert view["status"] == "completed"
    assert view["bank"]["sites"] == sorted(honest)
    for name in honest:
        assert _stage(view, name, "impute")["code"] == "ok"
        assert (layout.out / name / "imputed.csv").exists()
    plan = privacy_plan(4.0, 1e-6, len(COLUMNS), RunConfig().plan_params())
    bank = ModelBank.from_bytes((layout.coordinator_dir / "bank.npz").read_bytes())
    assert bank_problems(bank, ReleaseLimits.from_plan(plan, len(COLUMNS))) == []


def test_crafted_releases_are_excluded_with_the_vetting_problems(tmp_path: Path) -> None:
    """Finding 6: the coordinator accepted a release with |G| up to 3.6e13, eigenvalue -5e3,
    a claimed count of 1e9, boxes outside the bounds and sigma = 0, spoiling every other
    site's imputations. Each is now excluded with code bad_release and vetting's problem
    list, and the honest sites' run completes without them."""
    honest = {"a-honest": 200, "b-honest": 160}
    layout = _layout(tmp_path, {**honest, **dict.fromkeys(CRAFTS, 120)})
    _serve(layout, app=_crafting_app({name: craft for name, (craft, _) in CRAFTS.items()}))
    view = _view(layout)
    for name, (_, expected) in CRAFTS.items():
        outcome = _stage(view, name, "release")
        assert outcome["code"] == "bad_release", name
        assert any(expected in problem for problem in outcome["problems"]), (name, outcome)
        assert expected in outcome["reason"]
        assert not view["sites"][name]["active"]
    _assert_honest_run(layout, list(honest))


def test_a_release_manifest_claiming_min_records_1e8_does_not_fail_the_run(
        tmp_path: Path) -> None:
    """Finding 6: a manifest with min_records = 10**8 made assemble_bank raise and failed
    the run for everyone. Now the site is excluded (with cells or without) and the others'
    run completes."""
    honest = {"a-honest": 200, "b-honest": 160}
    layout = _layout(tmp_path, {**honest, "empty-release": 120, "full-release": 120})
    _serve(layout, app=_crafting_app({"empty-release": _min_records(cells=False),
                                      "full-release": _min_records(cells=True)}))
    view = _view(layout)
    empty = _stage(view, "empty-release", "release")
    assert empty["code"] == "bad_release"
    assert empty["problems"] == ["min_records 100000000, the plan's is 10"]
    full = _stage(view, "full-release", "release")
    assert full["code"] == "bad_release" and "fewer than 100000000 records" in full["reason"]
    _assert_honest_run(layout, list(honest))


# -- site identity ----------------------------------------------------------------------------


def _impostor_config(tmp_path: Path, layout: FederationLayout, victim: int,
                     key: str) -> Path:
    """A site TOML claiming ``layout.sites[victim]``'s id, with its own data, ledger and
    outputs, and its own site key (``key="own"``) or none (``key="none"``)."""
    from fediim.protocol.site_config import load_site_config, site_config_toml

    home = tmp_path / "impostor"
    home.mkdir()
    _write_csv(home / "data.csv", _table(99, 150))
    site_key = None
    if key == "own":
        site_key = home / "site.key"
        write_keypair(site_key, home / "site.pub")
    config = load_site_config(layout.sites[victim].config).model_copy(update={
        "data": home / "data.csv", "ledger": home / "ledger.json", "output_dir": home,
        "site_key": site_key})
    (home / "site.toml").write_text(site_config_toml(config), encoding="utf-8")
    PrivacyLedger.create(config.ledger, config.budget.rho, config.site_id)
    return home / "site.toml"


@pytest.mark.parametrize(("impostor_node", "key", "reason"), [
    (100, "own", "does not verify under the key registered for site 'site-a'"),
    (199, "none", "the handshake reply is not signed"),
])
def test_an_impostor_claiming_a_registered_site_id_is_refused_alone(
        tmp_path: Path, impostor_node: int, key: str, reason: str) -> None:
    """Finding 6: a site that claimed another site's id got both excluded (site id was not
    bound to node identity). With a site registry, only the impostor is refused, whether
    it answers before (node 100) or after (node 199) the genuine site."""
    layout = _layout(tmp_path, {"site-a": 200, "site-b": 160, "site-c": 120})
    nodes = {**_nodes(layout),
             impostor_node: {"site-config": str(_impostor_config(tmp_path, layout, 0, key))}}
    grid = _serve(layout, nodes)
    view = _view(layout)
    assert view["status"] == "completed"
    refused = _stage(view, f"site-a@node-{impostor_node}", "handshake")
    assert refused["code"] == "bad_site_signature" and reason in refused["reason"]
    assert view["sites"]["site-a"]["node_id"] == 101
    assert _stage(view, "site-a", "impute")["code"] == "ok"
    assert {node for node, stage in grid.delivered if stage == "release"} == {101, 102, 103}


def test_a_supernode_key_identifies_its_site_and_an_unregistered_id_is_refused(
        tmp_path: Path) -> None:
    """Finding 6: the registry binds site ids to keys; a SuperNode's own node-authentication
    key (EC P-384, OpenSSH) serves as its site key, and an id missing from the registry is
    refused."""
    layout = _layout(tmp_path, {"site-a": 200, "site-b": 160, "site-c": 120})
    site_a = layout.sites[0]
    write_node_auth_keypair(site_a.directory / "node.key", site_a.directory / "node.pub")
    site_a.config.write_text(site_a.config.read_text().replace(
        str(site_a.directory / "site.key"), str(site_a.directory / "node.key")))
    assert layout.site_registry is not None
    layout.site_registry.write_text(site_registry_toml({
        "site-a": site_a.directory / "node.pub",
        "site-b": Path("../site-b/site.pub")}))  # relative to the registry file
    _serve(layout)
    view = _view(layout)
    assert view["status"] == "completed"
    assert _stage(view, "site-a", "impute")["code"] == "ok"
    assert _stage(view, "site-b", "impute")["code"] == "ok"
    refused = _stage(view, "site-c", "handshake")
    assert refused["code"] == "unregistered_site"
    assert "not in the coordinator's site registry site-registry.toml" in refused["reason"]


def test_without_a_registry_a_duplicate_site_id_excludes_only_the_later_claimant(
        tmp_path: Path) -> None:
    """Finding 6 (no registry configured): two nodes claiming one site id were both
    excluded; now the later claimant alone is refused, and logged."""
    layout = _layout(tmp_path, {"site-a": 200, "site-b": 160, "site-c": 120},
                     **{"site-registry": ""})
    first = layout.sites[0].config
    nodes = {101: {"site-config": str(first)}, 102: {"site-config": str(first)},
             103: {"site-config": str(layout.sites[1].config)},
             104: {"site-config": str(layout.sites[2].config)}}
    grid = _serve(layout, nodes)
    view = _view(layout)
    assert view["status"] == "completed" and view["site_registry"] is None
    assert {node for node, stage in grid.delivered if stage == "release"} == {101, 103, 104}
    assert view["sites"]["site-a"]["node_id"] == 101
    later = view["sites"]["site-a@node-102"]
    assert later["node_id"] == 102 and not later["active"]
    assert later["stages"]["handshake"]["code"] == "duplicate_site_id"
    assert "already taken in this run by node 101" in later["stages"]["handshake"]["reason"]


def test_handshake_signatures_bind_run_nonce_site_and_node(tmp_path: Path) -> None:
    """Finding 6: a handshake signature is worthless in another run, with another nonce,
    for another site id or from another node."""
    write_node_auth_keypair(tmp_path / "node.key", tmp_path / "node.pub")
    write_keypair(tmp_path / "ed.key", tmp_path / "ed.pub")
    claim = {"run_id": 7, "nonce": "ab" * 16, "site_id": "site-a", "node_id": 3}
    for private, public in (("node.key", "node.pub"), ("ed.key", "ed.pub")):
        key = load_site_private_key(tmp_path / private)
        public_key = load_site_public_key(tmp_path / public)
        assert site_key_id(key) == site_key_id(public_key)
        signature = sign_handshake(key, **claim)
        verify_handshake(public_key, signature, **claim)
        for name, other in (("run_id", 8), ("nonce", "cd" * 16), ("site_id", "site-b"),
                            ("node_id", 4)):
            with pytest.raises(SignatureError, match="does not verify"):
                verify_handshake(public_key, signature, **{**claim, name: other})
    assert site_key_id(load_site_public_key(tmp_path / "node.pub")).startswith("ecdsa-secp384r1:")


def test_a_site_registry_is_checked_when_the_run_starts(tmp_path: Path) -> None:
    """A registry naming a missing key, an invalid site id or unknown tables is a
    configuration error naming the file, before anything is sent."""
    write_keypair(tmp_path / "a.key", tmp_path / "a.pub")
    registry = tmp_path / "registry.toml"
    registry.write_text(site_registry_toml({"site-a": "a.pub"}))
    assert set(load_site_registry(registry).keys) == {"site-a"}
    for text, expected in (
            ('[sites]\nsite-a = "missing.pub"\n', "site 'site-a'"),
            ('[sites]\n"bad id!" = "a.pub"\n', "entry 'bad id!'"),
            ('[sites]\nsite-a = "a.pub"\n[extra]\n', "unknown keys ['extra']"),
            ('[sites]\nsite-a = "a.key"\n', "site 'site-a'")):
        registry.write_text(text)
        with pytest.raises(ConfigError, match="registry.toml") as caught:
            load_site_registry(registry)
        assert expected in str(caught.value)
    with pytest.raises(SigningKeyError, match="Ed25519 or ECDSA"):
        (tmp_path / "rsa.pub").write_bytes(_rsa_public_pem())
        load_site_public_key(tmp_path / "rsa.pub")


def _rsa_public_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(65537, 2048).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


# -- spend receipts and rewound ledgers -------------------------------------------------------


def test_receipts_verify_and_a_rewound_ledger_is_refused_at_the_next_run(
        tmp_path: Path) -> None:
    """Finding 6: the coordinator signs a spend receipt per release, which each site keeps
    next to its ledger, keeps every site's cumulative spend across runs, and refuses at the
    next handshake a site whose reported spend went down (a deleted ledger)."""
    layout = _layout(tmp_path, {"site-a": 200, "site-b": 160, "site-c": 120},
                     budget_epsilon=12.0)
    _serve(layout)
    view = _view(layout)
    public_key = load_public_key(layout.public_key)
    for site in layout.sites:
        (signed,) = read_receipts(receipts_path(site.ledger))
        receipt = verify_receipt(public_key, signed)
        spent = PrivacyLedger.open(site.ledger, epsilon_to_rho(12.0, 1e-6), site.site_id)
        assert (receipt.site_id, receipt.run_id) == (site.site_id, RUN_ID)
        assert receipt.rho_spent_total == spent.spent_rho > 0
        assert receipt.rho_charged == view["sites"][site.site_id]["rho_spent_this_run"]
        assert view["sites"][site.site_id]["receipt"] == receipt.model_dump()
    record = json.loads((layout.coordinator_dir / SPEND_RECORD_NAME).read_text())
    assert sorted(record["sites"]) == ["site-a", "site-b", "site-c"]
    assert view["spend_record"] == str(layout.coordinator_dir / SPEND_RECORD_NAME)

    rewound = layout.sites[0]
    rewound.ledger.unlink()
    PrivacyLedger.create(rewound.ledger, epsilon_to_rho(12.0, 1e-6), rewound.site_id)
    before = rewound.ledger.read_bytes()
    _serve(layout, run_id=RUN_ID + 1)
    view = _view(layout)
    refused = _stage(view, "site-a", "handshake")
    assert refused["code"] == "ledger_rewound"
    assert f"acknowledged by this coordinator's receipt of run {RUN_ID}" in refused["reason"]
    assert "deleted or rewound" in refused["reason"]
    assert rewound.ledger.read_bytes() == before
    assert view["status"] == "completed"  # the intact ledgers are not refused
    for site in layout.sites[1:]:
        assert [r.receipt.run_id for r in read_receipts(receipts_path(site.ledger))] == [
            RUN_ID, RUN_ID + 1]


def _tamper_receipt(node: int, stage: str, content: RecordDict) -> RecordDict:
    """Site b's receipt acknowledging less spend than it reported, signature kept."""
    if stage == "impute" and node == 102:
        arrays = content.array_records[ARRAYS_RECORD]
        payload = json.loads(arrays["receipt"].numpy().tobytes())
        payload["rho_spent_total"] = 0.0
        forged = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        arrays["receipt"] = Array(np.frombuffer(forged, dtype=np.uint8).copy())
    return content


def test_a_receipt_tampered_in_transit_is_refused_by_the_site(tmp_path: Path) -> None:
    """Finding 6: a site keeps only receipts that verify under its pinned coordinator key."""
    layout = _layout(tmp_path, {"site-a": 200, "site-b": 160, "site-c": 120})
    _serve(layout, tamper=_tamper_receipt)
    view = _view(layout)
    refused = _stage(view, "site-b", "impute")
    assert refused["code"] == "bad_signature"  # the bank itself is intact: the receipt
    assert not receipts_path(layout.sites[1].ledger).exists()
    assert not (layout.sites[1].directory / "imputed.csv").exists()
    assert view["status"] == "completed"
    assert len(read_receipts(receipts_path(layout.sites[0].ledger))) == 1


def test_an_unreadable_spend_record_stops_the_run_before_anything_is_sent(
        tmp_path: Path) -> None:
    """The coordinator must not forget what it acknowledged: a damaged spend record is a
    configuration error, not an empty record."""
    layout = _layout(tmp_path, {"site-a": 200, "site-b": 160})
    (layout.coordinator_dir / SPEND_RECORD_NAME).write_text("{not json")
    with pytest.raises(ConfigError, match="spend record is unreadable"):
        _serve(layout)


def test_the_federation_budget_policy_refuses_a_site_that_would_pass_it(
        tmp_path: Path) -> None:
    """max-total-epsilon: one run at epsilon 4 fits under a policy of 5 (a site's
    budget is 12); two would not (rho adds up: about epsilon 5.4), so at the second run
    every site is refused at the handshake, before it spends anything."""
    layout = _layout(tmp_path, {"site-a": 200, "site-b": 160}, budget_epsilon=12.0,
                     **{"max-total-epsilon": 5.0})
    _serve(layout)
    assert _view(layout)["status"] == "completed"
    spent = {site.site_id: site.ledger.read_bytes() for site in layout.sites}
    with pytest.raises(QuorumNotMet):
        _serve(layout, run_id=RUN_ID + 1)
    view = _view(layout)
    assert view["status"] == "failed"
    for site in layout.sites:
        refused = _stage(view, site.site_id, "handshake")
        assert refused["code"] == "federation_budget"
        assert "federation's policy" in refused["reason"]
        assert site.ledger.read_bytes() == spent[site.site_id]  # nothing charged
