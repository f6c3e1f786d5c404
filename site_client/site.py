"""A site's side of a fediim run: one function per stage, no Flower objects except records.

Each stage re-reads everything it needs from the site's TOML (a ClientApp runs in a new
process per message in a deployment) and never raises for an expected problem: it answers
with a :class:`~fediim.protocol.messages.ReplyCode` and a reason, and logs details locally. What a
reply may contain: codes, reasons (file *names*, never paths or cell values), the site's
ledger summary, its noised cells (release) and counts (impute).

The only state kept between messages (``context.state``) is a digest of the cells this site
released, so that at the impute stage it can check the bank carries them unaltered.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from contextlib import ExitStack
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from fediim.errors import (
    BankError,
    BudgetExceeded,
    DataError,
    FediimError,
    LedgerError,
    MessageError,
    SchemaError,
    SignatureError,
    SigningKeyError,
    SiteConfigError,
)
from fediim.federated import PrivacyPlan, site_impute, site_release
from fediim.federated.bank import ModelBank
from fediim.impute.estimator import ImputationResult
from fediim.io.atomic import atomic_open
from fediim.io.audit import audit_records, dump_audit_jsonl
from fediim.io.outputs import apply_schema, write_flags, write_table
from fediim.io.schema import TableSchema, load_schema
from fediim.io.table import Table, read_csv
from fediim.privacy import PrivacyLedger, SeededGaussianNoise, rho_to_epsilon
from fediim.protocol.identity import load_site_private_key, sign_handshake
from fediim.protocol.messages import (
    HandshakeReply,
    HandshakeRequest,
    ImputeReply,
    ImputeRequest,
    LedgerView,
    PrivacyRequest,
    ReleaseReply,
    ReleaseRequest,
    ReplyCode,
    parse_request,
    reply_type,
    request_stage,
)
from fediim.protocol.receipts import SignedReceipt, append_receipt, receipts_path, verify_receipt
from fediim.protocol.run_config import privacy_plan
from fediim.protocol.signing import key_id, load_public_key, signature_json, verify_bank
from fediim.protocol.site_config import SiteConfig, load_site_config

__all__ = ["NODE_CONFIG_KEY", "STATE_RECORD", "OUTPUT_FILES", "handle", "site_config_path"]

log = logging.getLogger("flwr.fediim.site")

#: The SuperNode ``--node-config`` key naming the site's TOML file.
NODE_CONFIG_KEY = "site-config"
#: ``context.state`` record holding what this site released in the current run.
STATE_RECORD = "fediim.site"
OUTPUT_FILES = ("imputed.csv", "flags.csv", "audit.jsonl", "bank.npz", "bank.sig.json")

_QUOTED = re.compile(r"""^(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""")


# Conversions between (epsilon, delta) and rho bisect over OpenDP (~0.1-0.3 s each): compute
# each distinct one once per process. Both functions are pure; PrivacyPlan is frozen.
_epsilon = lru_cache(maxsize=256)(rho_to_epsilon)
_plan = lru_cache(maxsize=32)(privacy_plan)


class _Refusal(FediimError):
    """Internal to this module: an expected reason to refuse a stage. :func:`handle` turns it
    into a reply with its code and reason; it never leaves this module."""

    def __init__(self, code: ReplyCode, reason: str, ledger: LedgerView | None = None) -> None:
        super().__init__(reason)
        self.code, self.reason, self.ledger = code, reason, ledger


def _redact_data_error(exc: DataError, data_path: Path) -> str:
    """A DataError for the coordinator: the file's name instead of its path, and the
    offending cell's text withheld (the full message stays in the site's log)."""
    text = str(exc)
    source = str(exc.source)
    if text.startswith(source):
        text = data_path.name + text[len(source):]
    head, sep, tail = text.partition(": ")
    if sep and exc.row is not None and exc.column is not None:
        tail = _QUOTED.sub("<cell value withheld>", tail, count=1)
    return head + sep + tail


def _after_source(exc: Exception) -> str:
    """An error's message without its leading ``<source>: `` (the site logs the full one)."""
    return str(exc).split(": ", 1)[-1]


class _Site:
    """Everything a stage needs, loaded lazily from the site TOML."""

    def __init__(self, config_path: str | None, node_id: int) -> None:
        self.site_id = f"node-{node_id}"
        self.node_id = int(node_id)
        if not config_path:
            raise _Refusal(ReplyCode.BAD_CONFIG,
                           f"the SuperNode has no --node-config '{NODE_CONFIG_KEY}=...' naming "
                           "the site's TOML file")
        try:
            self.cfg: SiteConfig = load_site_config(config_path)
        except SiteConfigError as exc:
            log.error("%s", exc)
            raise _Refusal(ReplyCode.BAD_CONFIG,
                           f"invalid site configuration {Path(config_path).name}: "
                           f"{_after_source(exc)}") from None
        self.site_id = self.cfg.site_id
        self._schema: TableSchema | None = None
        self._ledger: PrivacyLedger | None = None

    # -- pieces ---------------------------------------------------------------------------
    @property
    def schema(self) -> TableSchema:
        """The site's schema (a BAD_CONFIG refusal if it is invalid)."""
        if self._schema is None:
            try:
                self._schema = load_schema(self.cfg.schema_path)
                self._schema.bounds_array()
            except SchemaError as exc:
                log.error("%s", exc)
                raise _Refusal(ReplyCode.BAD_CONFIG,
                               f"the site's schema {self.cfg.schema_path.name} is invalid: "
                               f"{_after_source(exc)}") from None
        return self._schema

    def check_schema(self, schema_hash: str) -> None:
        """Refuse unless the coordinator's schema hash is this site's."""
        mine = self.schema.schema_hash()
        if mine != schema_hash:
            raise _Refusal(
                ReplyCode.SCHEMA_MISMATCH,
                f"schema mismatch: the site's schema {self.cfg.schema_path.name} has hash "
                f"{mine[:12]}…, the coordinator's has {schema_hash[:12]}… (columns, order, "
                "bounds and missing markers must agree)")

    def check_key(self, requested_key_id: str) -> Any:
        """The pinned coordinator public key, if ``requested_key_id`` names it; else refuse."""
        try:
            public_key = load_public_key(self.cfg.coordinator_public_key)
        except SigningKeyError as exc:
            log.error("%s", exc)
            raise _Refusal(ReplyCode.BAD_CONFIG,
                           "the site's pinned coordinator public key "
                           f"{self.cfg.coordinator_public_key.name} cannot be used: "
                           f"{_after_source(exc)}") from None
        if key_id(public_key) != requested_key_id:
            raise _Refusal(ReplyCode.KEY_MISMATCH,
                           f"the coordinator's signing key {requested_key_id} is not the key "
                           f"pinned by this site ({key_id(public_key)})")
        return public_key

    def table(self) -> Table:
        """The site's data (a BAD_DATA refusal, naming file, line and column, never a value)."""
        try:
            # A column this hospital never measures is what the federation is for.
            return read_csv(self.cfg.data, schema=self.schema, allow_empty_columns=True)
        except DataError as exc:
            log.error("site %s: %s", self.site_id, exc)
            raise _Refusal(ReplyCode.BAD_DATA,
                           "unreadable data: " + _redact_data_error(exc, self.cfg.data)) from None

    @property
    def ledger(self) -> PrivacyLedger:
        """The site's privacy ledger (a LEDGER_ERROR refusal if it cannot be used)."""
        if self._ledger is None:
            try:
                self._ledger = PrivacyLedger.open(self.cfg.ledger, self.cfg.budget.rho,
                                                  self.cfg.site_id)
            except (LedgerError, ValueError, OSError) as exc:
                log.error("site %s: %s", self.site_id, exc)
                message = str(exc).replace(str(self.cfg.ledger), self.cfg.ledger.name)
                raise _Refusal(ReplyCode.LEDGER_ERROR,
                               f"privacy ledger unusable: {message}") from None
        return self._ledger

    def ledger_view(self) -> LedgerView:
        """The ledger summary reported to the coordinator (as ``PrivacyLedger.summary``
        without the local path), (epsilon, delta) at the site's budget delta."""
        ledger, delta = self.ledger, self.cfg.budget.delta
        return LedgerView(releases=len(ledger.entries), rho_budget=ledger.rho_budget,
                          rho_spent=ledger.spent_rho, rho_remaining=ledger.remaining_rho,
                          delta=delta, epsilon_spent=_epsilon(ledger.spent_rho, delta),
                          epsilon_budget=_epsilon(ledger.rho_budget, delta))

    def ledger_view_if_open(self) -> LedgerView | None:
        """The ledger summary if the ledger was opened (to report a spend already charged
        when a stage fails unexpectedly), else None; never raises."""
        if self._ledger is None:
            return None
        try:
            return self.ledger_view()
        except Exception:  # noqa: BLE001 - only used while reporting another failure
            return None

    def plan(self, request: PrivacyRequest) -> PrivacyPlan:
        """This site's privacy plan for ``request`` (a BAD_REQUEST refusal if invalid)."""
        n_features = len(self.schema.columns)
        try:
            return _plan(request.epsilon, request.delta, n_features, request.plan_params())
        except ValueError as exc:
            raise _Refusal(ReplyCode.BAD_REQUEST, f"invalid privacy request: {exc}") from None

    def check_request(self, request: PrivacyRequest) -> tuple[Table, PrivacyPlan]:
        """Everything handshake and release check, in order; returns (table, plan)."""
        self.check_schema(request.schema_hash)
        self.check_key(request.coordinator_key_id)
        if request.seed >= 0 and not self.cfg.allow_seeded_noise:
            raise _Refusal(ReplyCode.SEEDED_NOISE_REFUSED,
                           "the coordinator asks for seeded (simulation-only) noise, which a "
                           "known seed makes removable; this site does not allow it "
                           "(allow_seeded_noise = false)")
        table = self.table()
        plan = self.plan(request)
        view = self.ledger_view()
        if not self.ledger.can_afford(plan.rho_total):
            raise _Refusal(
                ReplyCode.INSUFFICIENT_BUDGET,
                f"insufficient privacy budget: this fit needs rho={plan.rho_total:.6g} "
                f"(epsilon={request.epsilon:g}, delta={request.delta:g}) but only "
                f"rho={self.ledger.remaining_rho:.6g} of {self.ledger.rho_budget:.6g} remains",
                view)
        return table, plan


# -- stages ---------------------------------------------------------------------------------


def _handshake(site: _Site, request: HandshakeRequest, run_id: int) -> HandshakeReply:
    _, plan = site.check_request(request)
    log.info("site %s: handshake accepted (rho %.6g of remaining %.6g)", site.site_id,
             plan.rho_total, site.ledger.remaining_rho)
    return HandshakeReply(site_id=site.site_id, rho_requested=plan.rho_total,
                          ledger=site.ledger_view(),
                          site_signature=_handshake_signature(site, request, run_id))


# -- site identity and spend receipts (fediim.protocol.identity, fediim.protocol.receipts) --


def _handshake_signature(site: _Site, request: HandshakeRequest, run_id: int) -> bytes | None:
    """The site's signature over this run's handshake (nonce, run id, site id, node id), or
    None when the coordinator sent no nonce or the site's TOML names no ``site_key``."""
    if not request.nonce or site.cfg.site_key is None:
        return None
    try:
        key = load_site_private_key(site.cfg.site_key)
    except SigningKeyError as exc:
        log.error("%s", exc)
        raise _Refusal(ReplyCode.BAD_CONFIG, f"the site's key {site.cfg.site_key.name} cannot "
                       f"be used: {_after_source(exc)}") from None
    return sign_handshake(key, run_id=run_id, nonce=request.nonce, site_id=site.site_id,
                          node_id=site.node_id)


def _store_receipt(site: _Site, request: ImputeRequest, run_id: int) -> None:
    """Verify the coordinator's spend receipt for this site and run under the pinned key and
    append it to the receipts file next to the ledger; refuse a receipt that does not verify."""
    if request.receipt is None:
        return
    signed = SignedReceipt(request.receipt, request.receipt_signature or b"")
    try:
        receipt = verify_receipt(site.check_key(request.coordinator_key_id), signed)
    except SignatureError as exc:
        log.error("site %s: %s", site.site_id, exc)
        raise _Refusal(ReplyCode.BAD_SIGNATURE, str(exc)) from None
    if (receipt.site_id, receipt.run_id) != (site.site_id, int(run_id)):
        raise _Refusal(ReplyCode.BAD_SIGNATURE,
                       f"the spend receipt is for site {receipt.site_id!r} in run "
                       f"{receipt.run_id}, not this site in run {run_id}")
    try:
        append_receipt(receipts_path(site.cfg.ledger), signed)
    except OSError as exc:
        log.error("site %s: cannot store the spend receipt: %s", site.site_id, exc)
        raise _Refusal(ReplyCode.ERROR, f"cannot store the spend receipt ({exc.strerror}); "
                       "nothing was written") from None


def _cells_digest(bank: ModelBank, site_id: str) -> str:
    """Digest of one site's cells in a bank (order, ids, boxes, Gram matrices, noise)."""
    mask = bank.site == site_id
    digest = hashlib.sha256()
    digest.update("\n".join(bank.cell[mask].tolist()).encode("utf-8"))
    for array in (bank.lo[mask], bank.hi[mask], bank.gram[mask], bank.sigma[mask]):
        digest.update(np.ascontiguousarray(array, dtype=np.float64).tobytes())
    return digest.hexdigest()


def _release(site: _Site, request: ReleaseRequest, run_id: int,
             state: RecordDict) -> ReleaseReply:
    table, plan = site.check_request(request)
    noise = None
    if request.seed >= 0:
        if request.seed_index < 0:
            raise _Refusal(ReplyCode.BAD_REQUEST, "seeded noise needs a seed_index >= 0")
        noise = SeededGaussianNoise(
            np.random.SeedSequence(request.seed, spawn_key=(request.seed_index,)))
    bounds = site.schema.bounds_array()
    try:
        bank = site_release(table.values, bounds, plan, site_id=site.site_id, ledger=site.ledger,
                            noise=noise)
    except BudgetExceeded as exc:
        raise _Refusal(ReplyCode.INSUFFICIENT_BUDGET, f"insufficient privacy budget: {exc}",
                       site.ledger_view()) from None
    except LedgerError as exc:
        log.error("site %s: %s", site.site_id, exc)
        raise _Refusal(ReplyCode.LEDGER_ERROR, "privacy ledger changed during the release; "
                       "nothing was sent", site.ledger_view()) from None
    state[STATE_RECORD] = ConfigRecord({
        "run_id": int(run_id), "site_id": site.site_id,
        "cells_sha256": _cells_digest(bank, site.site_id), "n_cells": bank.n_cells,
    })
    log.info("site %s: released %d cells (rho spent %.6g of %.6g)", site.site_id, bank.n_cells,
             site.ledger.spent_rho, site.ledger.rho_budget)
    return ReleaseReply(site_id=site.site_id, bank=bank.to_bytes(), n_cells=bank.n_cells,
                        ledger=site.ledger_view())


def _write_outputs(out: Path, result: ImputationResult, columns: list[str],
                   request: ImputeRequest, run_id: int) -> None:
    """All outputs staged as temporary files and renamed into place together, table last."""
    out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        table_file = stack.enter_context(atomic_open(out / "imputed.csv", "w", newline=""))
        audit_file = stack.enter_context(atomic_open(out / "audit.jsonl", "w", newline=""))
        flags_file = stack.enter_context(atomic_open(out / "flags.csv", "w", newline=""))
        bank_file = stack.enter_context(atomic_open(out / "bank.npz", "wb"))
        signature_file = stack.enter_context(atomic_open(out / "bank.sig.json", "w", newline=""))
        bank_file.write(request.bank)
        signature_file.write(signature_json(request.signature, request.bank,
                                            request.schema_hash, run_id,
                                            request.coordinator_key_id))
        write_flags(flags_file, result, columns)
        dump_audit_jsonl(audit_file, audit_records(result, columns, k=request.k))
        write_table(table_file, result.values, columns)


def _verified_bank(site: _Site, request: ImputeRequest, run_id: int,
                   state: RecordDict) -> ModelBank:
    """The federation bank, once its signature verifies under the pinned key, it fits the
    schema and it carries this site's own cells as released in this run; else refuse."""
    site.check_schema(request.schema_hash)
    public_key = site.check_key(request.coordinator_key_id)
    try:
        verify_bank(public_key, request.signature, request.bank, request.schema_hash, run_id)
    except SignatureError as exc:
        log.error("site %s: %s", site.site_id, exc)
        raise _Refusal(ReplyCode.BAD_SIGNATURE, str(exc)) from None
    try:
        bank = ModelBank.from_bytes(request.bank, source="the federation bank")
    except BankError as exc:
        raise _Refusal(ReplyCode.BAD_BANK, str(exc)) from None
    n_features = len(site.schema.columns)
    if bank.n_features != n_features:
        raise _Refusal(ReplyCode.BAD_BANK, f"the bank has {bank.n_features} features, the "
                       f"schema {n_features}")
    released = state.config_records.get(STATE_RECORD)
    if released is not None and int(released["run_id"]) == int(run_id):
        if _cells_digest(bank, site.site_id) != released["cells_sha256"]:
            raise _Refusal(ReplyCode.BAD_BANK, "the bank does not carry this site's cells as "
                           "it released them; refusing to use it")
    return bank


def _impute(site: _Site, request: ImputeRequest, run_id: int, state: RecordDict) -> ImputeReply:
    bank = _verified_bank(site, request, run_id, state)
    _store_receipt(site, request, run_id)
    table = site.table()
    bounds = site.schema.bounds_array()
    try:
        result = site_impute(table.values, bank, bounds, mode=request.mode,
                             n_neighbors=request.k, site_id=site.site_id)
    except (BankError, ValueError) as exc:
        raise _Refusal(ReplyCode.ERROR, f"imputation failed: {exc}") from None
    apply_schema(result, site.schema, site.schema.column_names)
    if not np.isfinite(result.values[result.imputed]).all():
        raise _Refusal(ReplyCode.ERROR, "imputation produced a non-finite value; nothing was "
                       "written")
    try:
        _write_outputs(site.cfg.output_dir, result, table.columns, request, run_id)
    except OSError as exc:
        log.error("site %s: cannot write outputs: %s", site.site_id, exc)
        raise _Refusal(ReplyCode.ERROR, f"cannot write the outputs ({exc.strerror}); nothing "
                       "was written") from None
    n_cells = int(result.imputed.sum())
    log.info("site %s: imputed %d cells -> %s", site.site_id, n_cells, site.cfg.output_dir)
    return ImputeReply(site_id=site.site_id, n_rows=table.n_rows,
                       n_incomplete_rows=int(table.missing_mask.any(axis=1).sum()),
                       n_imputed_cells=n_cells, outputs=list(OUTPUT_FILES),
                       ledger=site.ledger_view())


def site_config_path(node_config: dict[str, Any], run_config: dict[str, Any]) -> str | None:
    """The site TOML of this node: ``--node-config site-config=...`` (deployment), else, for a
    node of the Simulation Engine (which only has ``partition-id``), entry ``partition-id``
    of the run config's ``site-configs`` JSON list."""
    path = node_config.get(NODE_CONFIG_KEY)
    if path:
        return str(path)
    if "partition-id" in node_config and run_config.get("site-configs"):
        try:
            paths = json.loads(str(run_config["site-configs"]))
            return str(paths[int(node_config["partition-id"])])
        except (ValueError, IndexError, TypeError, KeyError):
            return None
    return None


def _answer(site: _Site, request: HandshakeRequest | ReleaseRequest | ImputeRequest,
            run_id: int, state: RecordDict) -> HandshakeReply | ReleaseReply | ImputeReply:
    """The stage function of ``request``'s stage."""
    if isinstance(request, HandshakeRequest):
        return _handshake(site, request, run_id)
    if isinstance(request, ReleaseRequest):
        return _release(site, request, run_id, state)
    return _impute(site, request, run_id, state)


def handle(content: RecordDict, *, node_config: dict[str, Any], run_id: int, node_id: int,
           state: RecordDict, run_config: dict[str, Any] | None = None) -> RecordDict:
    """Answer one request record with one reply record (never raises for a bad request)."""
    try:
        stage = request_stage(content)
    except MessageError as exc:
        return HandshakeReply(site_id=f"node-{node_id}", code=ReplyCode.BAD_REQUEST,
                              reason=str(exc)).to_record()
    reply_model = reply_type(stage)
    site_id = f"node-{node_id}"
    site: _Site | None = None
    try:
        request = parse_request(content)
        site = _Site(site_config_path(node_config, run_config or {}), node_id)
        site_id = site.site_id
        reply = _answer(site, request, run_id, state)
    except MessageError as exc:
        reply = reply_model(site_id=site_id, code=ReplyCode.BAD_REQUEST, reason=str(exc))
    except _Refusal as exc:
        log.warning("site %s: %s refused (%s): %s", site_id, stage, exc.code, exc.reason)
        reply = reply_model(site_id=site_id, code=exc.code, reason=exc.reason,
                            ledger=exc.ledger)
    except Exception as exc:  # noqa: BLE001 - a site must answer, not crash; details stay local
        log.exception("site %s: %s failed", site_id, stage)
        reply = reply_model(site_id=site_id, code=ReplyCode.ERROR,
                            ledger=site.ledger_view_if_open() if site is not None else None,
                            reason=f"internal error at the site ({type(exc).__name__}); see "
                                   "the site's log")
    return reply.to_record()
