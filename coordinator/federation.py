"""The coordinator's side of a fediim run, driven through a Flower ``Grid``.

Three stages, each one request per site and one reply per site (a secure run replaces the
release by the secure rounds of :mod:`coordinator.secure`; run config ``aggregation``):

1. **handshake** — every connected SuperNode gets the schema hash, the coordinator's
   signing-key id, the requested spend and a fresh nonce; sites accept or refuse with a
   reason. The coordinator admits a site only as :mod:`coordinator.admission` says
   (identity, one node per site id, no rewound ledger, same plan).
2. **release** — accepted sites release their noised cells (charged to their own ledgers).
   Every release is vetted against the plan (:func:`fediim.federated.vetting.release_problems`):
   a site whose cells do not fit is excluded with the problems found, and the run goes on
   with the others. Each site that reports its ledger gets a signed spend receipt, kept in
   the coordinator's spend record (:mod:`coordinator.spend`).
3. **impute** — the coordinator assembles the bank (``assemble_bank``), signs it (Ed25519)
   and sends it, with each site's receipt, to the sites that released; they impute locally
   and report a status.

A site that refuses, fails, answers malformed or stays silent past the stage's timeout is
excluded from the rest of the run, and the reason is logged and recorded. Quorum
(``min-sites``) is checked after every stage; when it fails the run raises
:class:`QuorumNotMet` (the Flower run then finishes as *failed*). The federation-level view
of every site's reported spend is written to ``out-dir/federation.json`` after every stage,
so it is there even when the run fails.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from coordinator.admission import Admission
from coordinator.config import CoordinatorConfig
from coordinator.spend import SpendRecord, spend_went_down
from fediim.errors import BankError, MessageError, QuorumNotMet
from fediim.federated import assemble_bank
from fediim.federated.bank import ModelBank
from fediim.federated.secure_release import default_threshold
from fediim.federated.vetting import ReleaseLimits, release_problems
from fediim.impute.encoding import release_columns
from fediim.io.atomic import atomic_write_bytes, atomic_write_text
from fediim.io.schema import load_schema
from fediim.privacy import epsilon_to_rho
from fediim.protocol.clock import Clock
from fediim.protocol.identity import load_site_registry
from fediim.protocol.messages import (
    MESSAGE_TYPE,
    HandshakeReply,
    HandshakeRequest,
    ImputeReply,
    ImputeRequest,
    ReleaseReply,
    ReleaseRequest,
    ReplyCode,
    SecureReply,
    reply_type,
)
from fediim.protocol.receipts import SignedReceipt, issue_receipt
from fediim.protocol.run_config import privacy_plan
from fediim.protocol.secure_run import session_statistics, use_secure
from fediim.protocol.signing import key_id, load_private_key, sign_bank, signature_json

__all__ = ["FEDERATION_FORMAT", "PULL_INTERVAL", "QuorumNotMet"]

log = logging.getLogger("flwr.fediim.coordinator")

FEDERATION_FORMAT = "fediim-federation/1"


#: Seconds between pulls for replies, and between looks for connected SuperNodes. Flower's
#: own ``send_and_receive`` sleeps 3 s between pulls; the pulls go to the SuperLink next to
#: the ServerApp, so polling faster is cheap and shortens every round.
PULL_INTERVAL = 0.5


def _send_and_receive(grid: Grid, messages: list[Message], timeout: float,
                      clock: Clock) -> list[Message]:
    """``Grid.send_and_receive`` with a shorter pull interval (public Grid API only). Replies
    come in the order they were pulled; those pulled together, by node id."""
    pending = set(grid.push_messages(messages))
    deadline = clock.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        pulled = sorted(grid.pull_messages(pending),
                        key=lambda reply: int(reply.metadata.src_node_id))
        replies += pulled
        pending -= {reply.metadata.reply_to_message_id for reply in pulled}
        if not pending or clock.monotonic() >= deadline:
            break
        clock.sleep(min(PULL_INTERVAL, max(0.0, deadline - clock.monotonic())))
    return replies


@dataclass
class _Site:
    """One SuperNode's standing in the run: its stages' outcomes and reported ledger."""

    node_id: int
    site_id: str
    active: bool = True
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    ledger_before: dict[str, Any] | None = None
    ledger: dict[str, Any] | None = None
    receipt: SignedReceipt | None = None

    def exclude(self, stage: str, code: str, reason: str,
                problems: list[str] | None = None) -> None:
        """Leave the run at ``stage``, recording (and logging) why; ``problems`` lists what
        vetting found wrong with the site's release."""
        self.active = False
        self.stages[stage] = {"code": code, "reason": reason,
                              **({"problems": problems} if problems is not None else {})}
        log.warning("excluding site %s (node %d) at %s: %s: %s", self.site_id, self.node_id,
                    stage, code, reason)

    def rho_spent_this_run(self) -> float | None:
        """What the site's ledger reports it spent since the handshake, if it reported both."""
        if self.ledger is None or self.ledger_before is None:
            return None
        return max(0.0, self.ledger["rho_spent"] - self.ledger_before["rho_spent"])

    def view(self) -> dict[str, Any]:
        """This site's entry in ``federation.json``."""
        receipt = self.receipt.receipt.model_dump() if self.receipt is not None else None
        return {"node_id": self.node_id, "active": self.active, "stages": self.stages,
                "ledger": self.ledger, "rho_spent_this_run": self.rho_spent_this_run(),
                "receipt": receipt}


class _Federation:
    """One run's state: the coordinator's own material, every site's standing, the bank."""

    def __init__(self, grid: Grid, cfg: CoordinatorConfig, run_id: int, clock: Clock) -> None:
        self.grid, self.cfg, self.run_id, self.clock = grid, cfg, int(run_id), clock
        # Fail on our own configuration before anything is sent to a site.
        self.schema = load_schema(cfg.schema_path)
        self.schema.bounds_array()
        self.schema_hash = self.schema.schema_hash()
        self.key = load_private_key(cfg.signing_key)
        self.key_id = key_id(self.key)
        self.n_features = len(self.schema.columns)
        # Coded columns are released as their encoded (one-hot) columns, per site or summed;
        # the plan's noise is still the table's m columns' (see fediim.federated.release).
        self.columns = release_columns(self.schema)
        self.width = self.columns.width
        plan = privacy_plan(cfg.epsilon, cfg.delta, self.n_features, cfg.plan_params())
        self.plan = plan
        self.rho = plan.rho_total
        self.limits = ReleaseLimits.from_plan(plan, self.width)
        self.spend = SpendRecord.beside_key(cfg.signing_key)
        self.admission = Admission(
            run_id=self.run_id, nonce=secrets.token_hex(16), rho=self.rho, spend=self.spend,
            registry=load_site_registry(cfg.site_registry) if cfg.site_registry else None,
            max_total_rho=(epsilon_to_rho(cfg.max_total_epsilon, cfg.delta)
                           if cfg.max_total_epsilon > 0 else math.inf))
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.sites: dict[int, _Site] = {}
        self.bank_info: dict[str, Any] | None = None
        #: "secure" or "per-site", decided after the handshake; the secure rounds' record.
        self.aggregation: str | None = None
        self.secure_info: dict[str, Any] | None = None
        #: The threshold the handshake asked keys for (0: none), and each node's keys.
        self.handshake_threshold = 0
        self.handshake_adverts: dict[int, bytes] = {}
        self.started = clock.monotonic()

    def privacy_fields(self) -> dict[str, Any]:
        """The fields of a handshake or release request (the same in both)."""
        return {"schema_hash": self.schema_hash, "coordinator_key_id": self.key_id,
                "epsilon": self.cfg.epsilon, "delta": self.cfg.delta, "seed": self.cfg.seed,
                **self.cfg.plan_fields()}

    # -- bookkeeping --------------------------------------------------------------------
    def _by_site_id(self) -> list[_Site]:
        return sorted(self.sites.values(), key=lambda site: (site.site_id, site.node_id))

    def _view_names(self) -> dict[int, str]:
        """Each node's name in ``federation.json``: its site id, or ``<site id>@node-<id>``
        when several nodes claimed that id and this one was not admitted under it."""
        claims = Counter(site.site_id for site in self.sites.values())
        admitted = self.admission.admitted
        return {node: site.site_id
                if claims[site.site_id] == 1 or admitted.get(site.site_id) == node
                else f"{site.site_id}@node-{node}"
                for node, site in self.sites.items()}

    def active(self) -> list[_Site]:
        """The sites still in the run, by site id."""
        return [site for site in self._by_site_id() if site.active]

    def write_view(self, status: str, error: str | None = None) -> None:
        """The federation-level ledger view: what every site reported spending."""
        cfg, names = self.cfg, self._view_names()
        doc = {
            "format": FEDERATION_FORMAT,
            "run_id": self.run_id,
            "status": status,
            "error": error,
            "elapsed_seconds": round(self.clock.monotonic() - self.started, 3),
            "schema_hash": self.schema_hash,
            "coordinator_key_id": self.key_id,
            "request": {"epsilon": cfg.epsilon, "delta": cfg.delta, "rho_per_site": self.rho,
                        "seeded_noise": cfg.seed >= 0, "mode": cfg.mode, "k": cfg.k,
                        **cfg.plan_fields()},
            "min_sites": cfg.min_sites,
            "site_registry": cfg.site_registry or None,
            "spend_record": str(self.spend.path),
            "sites": {names[site.node_id]: site.view() for site in self._by_site_id()},
            "aggregation": self.aggregation,
            "secure": self.secure_info,
            "bank": self.bank_info,
        }
        atomic_write_text(self.out / "federation.json",
                          json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n")

    def check_quorum(self, stage: str) -> None:
        """Raise :class:`QuorumNotMet` (after writing the view) if too few sites remain."""
        remaining = len(self.active())
        if remaining >= self.cfg.min_sites:
            log.info("after %s: %d site(s) remain (min-sites %d)", stage, remaining,
                     self.cfg.min_sites)
            return
        excluded = "; ".join(
            f"{site.site_id}: {outcome['code']}: {outcome['reason']}"
            for site in self._by_site_id() if not site.active
            for outcome in site.stages.values() if outcome.get("code") != ReplyCode.OK
        )
        message = (f"quorum not met after {stage}: {remaining} site(s) remain, min-sites is "
                   f"{self.cfg.min_sites}" + (f" (excluded: {excluded})" if excluded else ""))
        self.write_view("failed", message)
        raise QuorumNotMet(message)

    # -- one stage ------------------------------------------------------------------------
    def exchange(self, stage: str, requests: dict[int, RecordDict], timeout: float,
                 kind: str | None = None) -> dict:
        """Send one request per node, collect the replies; exclude failing/silent sites.
        ``kind``: the message stage of the replies when ``stage`` names a secure round."""
        messages = [Message(content, node, MESSAGE_TYPE, ttl=timeout, group_id=stage)
                    for node, content in requests.items()]
        log.info("%s: sending to %d site(s), timeout %.0f s", stage, len(messages), timeout)
        sent_at = self.clock.monotonic()
        replies = _send_and_receive(self.grid, messages, timeout, self.clock)
        log.info("%s: %d repl(ies) in %.1f s", stage, len(replies),
                 self.clock.monotonic() - sent_at)
        parsed: dict[int, Any] = {}
        for reply in replies:
            node = int(reply.metadata.src_node_id)
            if node in requests and node not in parsed:
                parsed[node] = self._parse_reply(stage, reply, kind or stage)
        for node in requests:
            if node not in parsed:
                self.sites[node].exclude(stage, "silent",
                                         f"no reply within the {stage} timeout ({timeout:g} s)")
        return {node: reply for node, reply in parsed.items() if reply is not None}

    def _parse_reply(self, stage: str, reply: Message, kind: str) -> Any:
        """The reply's content as ``kind``'s reply model, or None (the site is excluded)."""
        site = self.sites[int(reply.metadata.src_node_id)]
        if reply.has_error():
            site.exclude(stage, "error", f"the site's ClientApp failed: {reply.error.reason}")
            return None
        try:
            return reply_type(kind).from_record(reply.content)
        except MessageError as exc:
            site.exclude(stage, "malformed_reply", str(exc))
            return None

    # -- the run ------------------------------------------------------------------------
    def wait_for_nodes(self) -> list[int]:
        """The connected SuperNodes, once enough are there or ``node-wait-timeout`` passed."""
        deadline = self.clock.monotonic() + self.cfg.node_wait_timeout
        while True:
            nodes = sorted(int(node) for node in self.grid.get_node_ids())
            if len(nodes) >= self.cfg.wanted_sites or self.clock.monotonic() >= deadline:
                return nodes
            self.clock.sleep(PULL_INTERVAL)

    def handshake(self) -> None:
        """Stage 1: every connected site accepts this run's request, or is excluded."""
        nodes = self.wait_for_nodes()
        log.info("%d SuperNode(s) connected: %s", len(nodes), nodes)
        for node in nodes:
            self.sites[node] = _Site(node_id=node, site_id=f"node-{node}")
        request = HandshakeRequest(**self.privacy_fields(), nonce=self.admission.nonce,
                                   **self._secure_keys_asked(len(nodes))).to_record()
        replies: dict[int, HandshakeReply] = self.exchange(
            "handshake", {node: request for node in nodes}, self.cfg.handshake_timeout)
        for node, reply in replies.items():  # in the order the replies arrived
            site = self.sites[node]
            site.site_id = reply.site_id
            site.ledger = site.ledger_before = (
                reply.ledger.model_dump() if reply.ledger is not None else None)
            if reply.secagg is not None:
                self.handshake_adverts[node] = reply.secagg
            problem = self.admission.judge(node, reply)
            if problem is None:
                site.stages["handshake"] = {"code": "ok", "reason": ""}
            else:
                site.exclude("handshake", *problem)
        self.write_view("running")
        self.check_quorum("handshake")

    def _secure_keys_asked(self, n_nodes: int) -> dict[str, int]:
        """The handshake's request for secure-aggregation keys, when the run may sum
        securely: the threshold the sites would have if all ``n_nodes`` are admitted."""
        threshold = self.cfg.secure_threshold or default_threshold(n_nodes)
        if not use_secure(self.cfg.aggregation, n_nodes) or threshold > n_nodes:
            return {}
        self.handshake_threshold = threshold
        # no clipping histograms for coded columns: the sums' number is the encoding's
        return {"secure_threshold": threshold, "secure_sessions": len(
            session_statistics(self.plan, self.columns.clip_columns))}

    def choose_aggregation(self) -> bool:
        """Whether this run sums securely (run config ``aggregation``, on the sites admitted
        at the handshake); a threshold above them fails the run (:class:`QuorumNotMet`)."""
        n_admitted = len(self.active())
        secure = use_secure(self.cfg.aggregation, n_admitted)
        self.aggregation = "secure" if secure else "per-site"
        log.info("aggregation: %s (%s, %d site(s) admitted)", self.aggregation,
                 self.cfg.aggregation, n_admitted)
        if secure and self.cfg.secure_threshold > n_admitted:
            message = (f"secure-threshold {self.cfg.secure_threshold} is above the "
                       f"{n_admitted} site(s) admitted at the handshake")
            self.write_view("failed", message)
            raise QuorumNotMet(message)
        return secure

    def release(self) -> list[ModelBank]:
        """Stage 2: the active sites' noised cells, one bank per site that released."""
        requests = {
            site.node_id: ReleaseRequest(
                **self.privacy_fields(),
                seed_index=index if self.cfg.seed >= 0 else -1).to_record()
            for index, site in enumerate(self.active())
        }
        replies: dict[int, ReleaseReply] = self.exchange("release", requests,
                                                         self.cfg.release_timeout)
        banks: dict[str, ModelBank] = {}
        for node, reply in replies.items():
            bank = self._accept_release(self.sites[node], reply)
            if bank is not None:
                banks[self.sites[node].site_id] = bank
        self._issue_receipts(replies)
        self.write_view("running")
        self.check_quorum("release")
        return [banks[site.site_id] for site in self.active()]

    def _accept_release(self, site: _Site, reply: ReleaseReply) -> ModelBank | None:
        """The site's checked cells, or None (the site is excluded, with the reason)."""
        if reply.ledger is not None:
            site.ledger = reply.ledger.model_dump()
        if reply.site_id != site.site_id:
            site.exclude("release", "site_id_changed",
                         f"replied as {reply.site_id!r} after a handshake as {site.site_id!r}")
            return None
        if not reply.ok:
            site.exclude("release", str(reply.code), reply.reason)
            return None
        try:
            bank = self._check_release(site.site_id, reply)
        except BankError as exc:
            site.exclude("release", "bad_release", str(exc), [str(exc)])
            return None
        problems = self._vet(bank)
        if problems:
            site.exclude("release", "bad_release",
                         "the release does not fit the plan: " + "; ".join(problems), problems)
            return None
        site.stages["release"] = {"code": "ok", "reason": "", "n_cells": bank.n_cells}
        if bank.n_cells == 0:
            log.warning("site %s released no cell with at least %d records", site.site_id,
                        self.cfg.min_records)
        return bank

    def _check_release(self, site_id: str, reply: ReleaseReply) -> ModelBank:
        if reply.bank is None:
            raise BankError("the release carries no cells")
        bank = ModelBank.from_bytes(reply.bank, source=f"site {site_id}'s release")
        if bank.n_features != self.width:
            raise BankError(f"cells over {bank.n_features} attributes, the schema has "
                            f"{self.width}")
        if bank.n_cells != reply.n_cells:
            raise BankError(f"reports {reply.n_cells} cells but sent {bank.n_cells}")
        if bank.n_cells and (set(bank.site.tolist()) != {site_id}
                             or len(set(bank.cell.tolist())) != bank.n_cells):
            raise BankError("cells must all belong to the releasing site and have unique ids")
        return bank

    def _vet(self, bank: ModelBank) -> list[str]:
        """Why a site's release does not fit the plan (see :mod:`fediim.federated.vetting`)."""
        return release_problems(bank, self.limits)

    def _issue_receipts(self, replies: dict[int, ReleaseReply] | dict[int, SecureReply],
                        stage: str = "release") -> None:
        """Sign a spend receipt for every site that reported its ledger after releasing (as
        the site it claimed at the handshake), file them in the spend record and save it. A
        site whose reported spend went down since the handshake is excluded instead."""
        for node, reply in replies.items():
            site = self.sites[node]
            if (reply.ledger is None or site.ledger_before is None
                    or reply.site_id != site.site_id):
                continue
            if spend_went_down(reply.ledger.rho_spent, site.ledger_before["rho_spent"]):
                site.exclude(stage, "ledger_rewound",
                             f"the site reports rho={reply.ledger.rho_spent:.6g} spent, less "
                             f"than the rho={site.ledger_before['rho_spent']:.6g} it reported "
                             "at the handshake")
                continue
            site.receipt = issue_receipt(
                self.key, site_id=site.site_id, run_id=self.run_id,
                rho_charged=site.rho_spent_this_run() or 0.0,
                rho_spent_total=reply.ledger.rho_spent)
            self.spend.file(site.receipt)
        self.spend.save()

    def per_site_bank(self) -> ModelBank:
        """The federation bank assembled from every active site's released cells."""
        return assemble_bank(self.release(), meta={"epsilon": self.cfg.epsilon,
                                                   "delta": self.cfg.delta})

    def _sign_and_store(self, bank: ModelBank) -> tuple[bytes, bytes]:
        """Sign the federation bank, write both to ``out-dir``; (bank, sig)."""
        data = bank.to_bytes()
        signature = sign_bank(self.key, data, self.schema_hash, self.run_id)
        atomic_write_bytes(self.out / "bank.npz", data)
        atomic_write_text(self.out / "bank.sig.json",
                          signature_json(signature, data, self.schema_hash, self.run_id,
                                         self.key_id))
        self.bank_info = {"n_cells": bank.n_cells, "sha256": hashlib.sha256(data).hexdigest(),
                          "sites": sorted(set(bank.site.tolist())), "file": "bank.npz",
                          "signature_file": "bank.sig.json"}
        log.info("bank: %d cells, signed with %s", bank.n_cells, self.key_id)
        return data, signature

    def impute(self, bank: ModelBank) -> None:
        """Stage 3: send the signed bank; every active site imputes its own records."""
        data, signature = self._sign_and_store(bank)
        requests = {
            site.node_id: ImputeRequest(
                schema_hash=self.schema_hash, coordinator_key_id=self.key_id, bank=data,
                signature=signature, mode=self.cfg.mode, k=self.cfg.k,
                receipt=site.receipt.payload if site.receipt is not None else None,
                receipt_signature=site.receipt.signature if site.receipt is not None else None,
            ).to_record()
            for site in self.active()
        }
        replies: dict[int, ImputeReply] = self.exchange("impute", requests,
                                                        self.cfg.impute_timeout)
        for node, reply in replies.items():
            site = self.sites[node]
            if reply.ledger is not None:
                site.ledger = reply.ledger.model_dump()
            if not reply.ok:
                site.exclude("impute", str(reply.code), reply.reason)
                continue
            site.stages["impute"] = {"code": "ok", "reason": ""}
        self.write_view("running")
        self.check_quorum("impute")
