"""The coordinator's side of a fediim run, driven through a Flower ``Grid``.

Three rounds, each one request per site and one reply per site:

1. **handshake** — every connected SuperNode gets the schema hash, the coordinator's
   signing-key id and the requested spend; sites accept or refuse with a reason.
2. **release** — accepted sites release their noised cells (charged to their own ledgers).
3. **impute** — the coordinator assembles the bank (``assemble_bank``), signs it (Ed25519)
   and sends it to the sites that released; they impute locally and report counts.

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
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from coordinator.config import CoordinatorConfig
from fediim.errors import QuorumNotMet
from fediim.federated import assemble_bank, plan_privacy
from fediim.federated.bank import BankError, ModelBank
from fediim.io.atomic import atomic_write_bytes, atomic_write_text
from fediim.io.schema import load_schema
from fediim.protocol.messages import (
    MESSAGE_TYPE,
    HandshakeRequest,
    ImputeReply,
    ImputeRequest,
    MessageError,
    ReleaseReply,
    ReleaseRequest,
    ReplyCode,
    reply_type,
)
from fediim.protocol.signing import key_id, load_private_key, sign_bank, signature_json

__all__ = ["FEDERATION_FORMAT", "QuorumNotMet", "run_federation"]

log = logging.getLogger("flwr.fediim.coordinator")

FEDERATION_FORMAT = "fediim-federation/1"


#: Seconds between pulls for replies. Flower's own ``send_and_receive`` sleeps 3 s between
#: pulls; the pulls go to the SuperLink next to the ServerApp, so polling faster is cheap and
#: saves ~1.5 s per round on average.
PULL_INTERVAL = 0.5


def _send_and_receive(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """``Grid.send_and_receive`` with a shorter pull interval (public Grid API only)."""
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(min(PULL_INTERVAL, max(0.0, deadline - time.monotonic())))
    return replies


@dataclass
class _Site:
    node_id: int
    site_id: str
    active: bool = True
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    ledger_before: dict[str, Any] | None = None
    ledger: dict[str, Any] | None = None

    def exclude(self, stage: str, code: str, reason: str) -> None:
        self.active = False
        self.stages[stage] = {"code": code, "reason": reason}
        log.warning("excluding site %s (node %d) at %s: %s: %s", self.site_id, self.node_id,
                    stage, code, reason)

    def view(self) -> dict[str, Any]:
        spent = None
        if self.ledger is not None and self.ledger_before is not None:
            spent = max(0.0, self.ledger["rho_spent"] - self.ledger_before["rho_spent"])
        return {"node_id": self.node_id, "active": self.active, "stages": self.stages,
                "ledger": self.ledger, "rho_spent_this_run": spent}


class _Federation:
    def __init__(self, grid: Grid, cfg: CoordinatorConfig, run_id: int) -> None:
        self.grid, self.cfg, self.run_id = grid, cfg, int(run_id)
        # Fail on our own configuration before anything is sent to a site.
        self.schema = load_schema(cfg.schema_path)
        self.bounds = self.schema.bounds_array()
        self.schema_hash = self.schema.schema_hash()
        self.key = load_private_key(cfg.signing_key)
        self.key_id = key_id(self.key)
        self.m = len(self.schema.columns)
        self.rho = plan_privacy(cfg.epsilon, cfg.delta, self.m, **self._plan_kwargs()).rho_total
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.sites: dict[int, _Site] = {}
        self.bank_info: dict[str, Any] | None = None
        self.started = time.time()

    def _plan_kwargs(self) -> dict[str, Any]:
        c = self.cfg
        return {"min_records": c.min_records, "count_fraction": c.count_fraction,
                "max_depth": c.max_depth, "cell_noise_ratio": c.cell_noise_ratio}

    def _privacy_fields(self) -> dict[str, Any]:
        return {"schema_hash": self.schema_hash, "coordinator_key_id": self.key_id,
                "epsilon": self.cfg.epsilon, "delta": self.cfg.delta, "seed": self.cfg.seed,
                **self._plan_kwargs()}

    # -- bookkeeping --------------------------------------------------------------------
    def active(self) -> list[_Site]:
        return sorted((s for s in self.sites.values() if s.active), key=lambda s: s.site_id)

    def write_view(self, status: str, error: str | None = None) -> None:
        """The federation-level ledger view: what every site reported spending."""
        doc = {
            "format": FEDERATION_FORMAT,
            "run_id": self.run_id,
            "status": status,
            "error": error,
            "elapsed_seconds": round(time.time() - self.started, 3),
            "schema_hash": self.schema_hash,
            "coordinator_key_id": self.key_id,
            "request": {"epsilon": self.cfg.epsilon, "delta": self.cfg.delta,
                        "rho_per_site": self.rho, "seeded_noise": self.cfg.seed >= 0,
                        "mode": self.cfg.mode, "k": self.cfg.k, **self._plan_kwargs()},
            "min_sites": self.cfg.min_sites,
            "sites": {s.site_id: s.view()
                      for s in sorted(self.sites.values(), key=lambda s: s.site_id)},
            "bank": self.bank_info,
        }
        atomic_write_text(self.out / "federation.json",
                          json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n")

    def check_quorum(self, stage: str) -> None:
        n = len(self.active())
        if n >= self.cfg.min_sites:
            log.info("after %s: %d site(s) remain (min-sites %d)", stage, n, self.cfg.min_sites)
            return
        excluded = "; ".join(
            f"{s.site_id}: {st['code']}: {st['reason']}"
            for s in sorted(self.sites.values(), key=lambda s: s.site_id) if not s.active
            for st in s.stages.values() if st.get("code") != ReplyCode.OK
        )
        msg = (f"quorum not met after {stage}: {n} site(s) remain, min-sites is "
               f"{self.cfg.min_sites}" + (f" (excluded: {excluded})" if excluded else ""))
        self.write_view("failed", msg)
        raise QuorumNotMet(msg)

    # -- one stage ------------------------------------------------------------------------
    def exchange(self, stage: str, requests: dict[int, RecordDict], timeout: float) -> dict:
        """Send one request per node, collect the replies; exclude failing/silent sites."""
        msgs = [Message(rd, node, MESSAGE_TYPE, ttl=timeout, group_id=stage)
                for node, rd in requests.items()]
        log.info("%s: sending to %d site(s), timeout %.0f s", stage, len(msgs), timeout)
        t0 = time.monotonic()
        replies = _send_and_receive(self.grid, msgs, timeout)
        log.info("%s: %d repl(ies) in %.1f s", stage, len(replies), time.monotonic() - t0)
        parsed: dict[int, Any] = {}
        for rep in replies:
            node = int(rep.metadata.src_node_id)
            if node not in requests or node in parsed:
                continue
            site = self.sites[node]
            if rep.has_error():
                site.exclude(stage, "error", f"the site's ClientApp failed: {rep.error.reason}")
                parsed[node] = None
                continue
            try:
                reply = reply_type(stage).from_record(rep.content)
            except MessageError as exc:
                site.exclude(stage, "malformed_reply", str(exc))
                parsed[node] = None
                continue
            parsed[node] = reply
        for node in requests:
            if node not in parsed:
                self.sites[node].exclude(stage, "silent",
                                         f"no reply within the {stage} timeout ({timeout:g} s)")
        return {n: r for n, r in parsed.items() if r is not None}

    # -- the run ------------------------------------------------------------------------
    def wait_for_nodes(self) -> list[int]:
        deadline = time.monotonic() + self.cfg.node_wait_timeout
        while True:
            nodes = sorted(int(n) for n in self.grid.get_node_ids())
            if len(nodes) >= self.cfg.wanted_sites or time.monotonic() >= deadline:
                return nodes
            time.sleep(0.5)

    def handshake(self) -> None:
        nodes = self.wait_for_nodes()
        log.info("%d SuperNode(s) connected: %s", len(nodes), nodes)
        for n in nodes:
            self.sites[n] = _Site(node_id=n, site_id=f"node-{n}")
        rd = HandshakeRequest(**self._privacy_fields()).to_record()
        replies = self.exchange("handshake", {n: rd for n in nodes},
                                self.cfg.handshake_timeout)
        for node, rep in replies.items():
            site = self.sites[node]
            site.site_id = rep.site_id
            site.ledger = site.ledger_before = (
                rep.ledger.model_dump() if rep.ledger is not None else None)
        counts = Counter(rep.site_id for rep in replies.values())
        for node, rep in replies.items():
            site = self.sites[node]
            if counts[rep.site_id] > 1:
                site.site_id = f"{rep.site_id}@node-{node}"  # keep both in the view
                site.exclude("handshake", "duplicate_site_id",
                             f"{counts[rep.site_id]} SuperNodes claim site id {rep.site_id!r}")
            elif not rep.ok:
                site.exclude("handshake", str(rep.code), rep.reason)
            elif not math.isclose(rep.rho_requested, self.rho, rel_tol=1e-9):
                site.exclude("handshake", "plan_mismatch",
                             f"the site computed rho={rep.rho_requested!r} for this request, "
                             f"the coordinator {self.rho!r}")
            else:
                site.stages["handshake"] = {"code": "ok", "reason": ""}
        self.write_view("running")
        self.check_quorum("handshake")

    def release(self) -> list[ModelBank]:
        active = self.active()
        requests = {
            s.node_id: ReleaseRequest(**self._privacy_fields(),
                                      seed_index=i if self.cfg.seed >= 0 else -1).to_record()
            for i, s in enumerate(active)
        }
        replies: dict[int, ReleaseReply] = self.exchange("release", requests,
                                                         self.cfg.release_timeout)
        banks: dict[str, ModelBank] = {}
        for node, rep in replies.items():
            site = self.sites[node]
            if rep.ledger is not None:
                site.ledger = rep.ledger.model_dump()
            if rep.site_id != site.site_id:
                site.exclude("release", "site_id_changed",
                             f"replied as {rep.site_id!r} after a handshake as {site.site_id!r}")
                continue
            if not rep.ok:
                site.exclude("release", str(rep.code), rep.reason)
                continue
            try:
                bank = self._check_release(site.site_id, rep)
            except BankError as exc:
                site.exclude("release", "bad_release", str(exc))
                continue
            banks[site.site_id] = bank
            site.stages["release"] = {"code": "ok", "reason": "", "n_cells": bank.n_cells}
            if bank.n_cells == 0:
                log.warning("site %s released no cell with at least %d records", site.site_id,
                            self.cfg.min_records)
        self.write_view("running")
        self.check_quorum("release")
        return [banks[s.site_id] for s in self.active()]

    def _check_release(self, site_id: str, rep: ReleaseReply) -> ModelBank:
        if rep.bank is None:
            raise BankError("the release carries no cells")
        bank = ModelBank.from_bytes(rep.bank, source=f"site {site_id}'s release")
        if bank.n_features != self.m:
            raise BankError(f"cells over {bank.n_features} attributes, the schema has {self.m}")
        if bank.n_cells != rep.n_cells:
            raise BankError(f"reports {rep.n_cells} cells but sent {bank.n_cells}")
        if bank.n_cells and (set(bank.site.tolist()) != {site_id}
                             or len(set(bank.cell.tolist())) != bank.n_cells):
            raise BankError("cells must all belong to the releasing site and have unique ids")
        return bank

    def impute(self, releases: list[ModelBank]) -> None:
        bank = assemble_bank(releases, meta={"epsilon": self.cfg.epsilon,
                                             "delta": self.cfg.delta})
        data = bank.to_bytes()
        signature = sign_bank(self.key, data, self.schema_hash, self.run_id)
        atomic_write_bytes(self.out / "bank.npz", data)
        atomic_write_text(self.out / "bank.sig.json",
                          signature_json(signature, data, self.schema_hash, self.run_id,
                                         self.key_id))
        self.bank_info = {"n_cells": bank.n_cells, "sha256": hashlib.sha256(data).hexdigest(),
                          "sites": sorted(set(bank.site.tolist())), "file": "bank.npz",
                          "signature_file": "bank.sig.json"}
        log.info("bank: %d cells from %d site(s), signed with %s", bank.n_cells,
                 len(releases), self.key_id)
        rd = ImputeRequest(schema_hash=self.schema_hash, coordinator_key_id=self.key_id,
                           bank=data, signature=signature, mode=self.cfg.mode,
                           k=self.cfg.k).to_record()
        replies: dict[int, ImputeReply] = self.exchange(
            "impute", {s.node_id: rd for s in self.active()}, self.cfg.impute_timeout)
        for node, rep in replies.items():
            site = self.sites[node]
            if rep.ledger is not None:
                site.ledger = rep.ledger.model_dump()
            if not rep.ok:
                site.exclude("impute", str(rep.code), rep.reason)
                continue
            site.stages["impute"] = {"code": "ok", "reason": "", "n_rows": rep.n_rows,
                                     "n_incomplete_rows": rep.n_incomplete_rows,
                                     "n_imputed_cells": rep.n_imputed_cells}
        self.write_view("running")
        self.check_quorum("impute")


def run_federation(grid: Grid, cfg: CoordinatorConfig, run_id: int) -> dict[str, Any]:
    """Run the three stages; return the federation view (also in ``out-dir``).

    Raises :class:`QuorumNotMet` when too few sites remain after a stage, and
    configuration errors (schema, signing key) before anything is sent.
    """
    fed = _Federation(grid, cfg, run_id)
    log.info("fediim run %d: epsilon=%g delta=%g (rho=%.6g per site), min-sites %d%s",
             fed.run_id, cfg.epsilon, cfg.delta, fed.rho, cfg.min_sites,
             ", SEEDED NOISE (simulation only)" if cfg.seed >= 0 else "")
    try:
        fed.handshake()
        fed.impute(fed.release())
    except QuorumNotMet:
        raise
    except Exception as exc:
        fed.write_view("failed", f"{type(exc).__name__}: {exc}")
        raise
    fed.write_view("completed")
    log.info("fediim run %d completed: %d site(s) imputed", fed.run_id, len(fed.active()))
    return json.loads((fed.out / "federation.json").read_text(encoding="utf-8"))
