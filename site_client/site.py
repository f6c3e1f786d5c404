"""A site's side of a fediim run: one function per stage, no Flower objects except records.

Each stage re-reads everything it needs from the site's TOML (a ClientApp runs in a new
process per message in a deployment) and never raises for an expected problem: it answers
with a :class:`~fediim.protocol.messages.ReplyCode` and logs the details locally.

What a reply may contain: a code (whose reason text is fixed, see
:data:`~fediim.protocol.messages.REPLY_REASONS`), the site's ledger summary, the spend it
computed from the request (handshake) and its noised cells (release, charged to its ledger
first). Nothing else computed from the site's records leaves the site: no counts, no line or
column of a bad cell, no exception text. The outcome of an impute depends on the bank and
the site's configuration, never on its records: a bank is vetted as a whole against the
run's privacy plan before it touches the records, and any failure while imputing from a
vetted bank falls back to the site's own IIM with the same reply.

Budget rules the site owns: every spend is converted at the site's own delta (a request at
another delta is refused), a request above ``[budget] max_epsilon_per_run`` is refused, and
the site does not run without its ledger (created once with ``fediim ledger init``).

Per-run state (``context.state``, kept by the SuperNode for the run; never sent): after a
release, the run id, the request's plan and a digest of the cells released. An impute is
answered only in the run of this site's release, once: the bank must then carry this
site's cells unaltered and fit that plan. A coordinator cannot query a site's imputation
without a charged release in the same run, and cannot query it twice per release.
"""

from __future__ import annotations

import hashlib
import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from fediim.errors import (
    BudgetExceeded,
    DataError,
    LedgerError,
    MessageError,
    SchemaError,
    SignatureError,
    SigningKeyError,
    SiteConfigError,
)
from fediim.federated import PrivacyPlan, site_release
from fediim.federated.bank import ModelBank
from fediim.federated.vetting import ReleaseLimits, bank_problems
from fediim.impute.encoding import encoded_width, release_columns, schema_encoding
from fediim.io.atomic import atomic_outputs
from fediim.io.audit import audit_records, dump_audit_jsonl
from fediim.io.outputs import apply_schema, write_flags, write_table
from fediim.io.result import METHOD_FALLBACK, ImputationResult
from fediim.io.schema import TableSchema, load_schema
from fediim.io.table import Table, read_csv
from fediim.privacy import PrivacyLedger, SeededGaussianNoise, rho_to_epsilon
from fediim.protocol.clock import SYSTEM_CLOCK, Clock, sleep_to_quantum
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
    SecureReply,
    SecureRequest,
    parse_request,
    reply_type,
    request_stage,
)
from fediim.protocol.receipts import SignedReceipt, append_receipt, receipts_path, verify_receipt
from fediim.protocol.run_config import PlanFields, privacy_plan
from fediim.protocol.signing import key_id, load_public_key, signature_json, verify_bank
from fediim.protocol.site_config import SiteConfig, load_site_config
from site_client.refusal import Refusal as _Refusal
from site_client.refusal import spending_refusal
from site_client.secure import (
    HANDSHAKE_RECORD,
    RELEASE_RECORD,
    answer_secure,
    handshake_keys,
    handshake_record,
    secure_bank_problems,
)

__all__ = ["NODE_CONFIG_KEY", "STATE_RECORD", "OUTPUT_FILES", "handle", "site_config_path"]

log = logging.getLogger("flwr.fediim.site")

#: The SuperNode ``--node-config`` key naming the site's TOML file.
NODE_CONFIG_KEY = "site-config"
#: The clock a reply waits on (tests substitute a fake one).
REPLY_CLOCK: Clock = SYSTEM_CLOCK
#: ``context.state`` record holding what this site released in the current run.
STATE_RECORD = RELEASE_RECORD
OUTPUT_FILES = ("imputed.csv", "flags.csv", "audit.jsonl", "bank.npz", "bank.sig.json")


# Conversions between (epsilon, delta) and rho bisect over OpenDP (~0.1-0.3 s each): compute
# each distinct one once per process. Both functions are pure; PrivacyPlan is frozen.
_epsilon = lru_cache(maxsize=256)(rho_to_epsilon)
_plan = lru_cache(maxsize=32)(privacy_plan)


class _Site:
    """Everything a stage needs, loaded lazily from the site TOML."""

    def __init__(self, config_path: str | None, node_id: int) -> None:
        self.site_id = f"node-{node_id}"
        self.node_id = int(node_id)
        if not config_path:
            raise _Refusal(ReplyCode.BAD_CONFIG,
                           f"the SuperNode has no --node-config '{NODE_CONFIG_KEY}=...' naming "
                           "the site's TOML file")
        self.config_path = config_path
        try:
            self.cfg: SiteConfig = load_site_config(config_path)
        except SiteConfigError as exc:
            raise _Refusal(ReplyCode.BAD_CONFIG, str(exc)) from None
        self.site_id = self.cfg.site_id
        self._schema: TableSchema | None = None
        self._ledger: PrivacyLedger | None = None

    def reply_time_quantum(self) -> float:
        """Seconds: replies leave at whole multiples of this after the request arrived."""
        return float(self.cfg.reply_time_quantum)

    # -- pieces ---------------------------------------------------------------------------
    @property
    def schema(self) -> TableSchema:
        """The site's schema (a BAD_CONFIG refusal if it is invalid)."""
        if self._schema is None:
            try:
                self._schema = load_schema(self.cfg.schema_path)
                self._schema.bounds_array()
            except SchemaError as exc:
                raise _Refusal(ReplyCode.BAD_CONFIG, f"invalid schema: {exc}") from None
        return self._schema

    def check_schema(self, schema_hash: str) -> None:
        """Refuse unless the coordinator's schema hash is this site's."""
        mine = self.schema.schema_hash()
        if mine != schema_hash:
            raise _Refusal(ReplyCode.SCHEMA_MISMATCH,
                           f"schema mismatch: {self.cfg.schema_path} has hash {mine}, the "
                           f"coordinator's has {schema_hash}")

    def check_key(self, requested_key_id: str) -> Any:
        """The pinned coordinator public key, if ``requested_key_id`` names it; else refuse."""
        try:
            public_key = load_public_key(self.cfg.coordinator_public_key)
        except SigningKeyError as exc:
            raise _Refusal(ReplyCode.BAD_CONFIG, f"pinned coordinator key: {exc}") from None
        if key_id(public_key) != requested_key_id:
            raise _Refusal(ReplyCode.KEY_MISMATCH,
                           f"the coordinator's signing key {requested_key_id} is not the key "
                           f"pinned by this site ({key_id(public_key)})")
        return public_key

    def table(self) -> Table:
        """The site's data (a BAD_DATA refusal; the details stay in the site's log)."""
        try:
            # A column this hospital never measures is what the federation is for.
            return read_csv(self.cfg.data, schema=self.schema, allow_empty_columns=True)
        except DataError as exc:
            raise _Refusal(ReplyCode.BAD_DATA, f"unreadable data: {exc}") from None

    @property
    def ledger(self) -> PrivacyLedger:
        """The site's privacy ledger: a LEDGER_MISSING refusal if there is none (the site
        never runs without it), LEDGER_ERROR if it cannot be used."""
        if self._ledger is None:
            path = self.cfg.ledger
            if not path.exists():
                raise _Refusal(
                    ReplyCode.LEDGER_MISSING,
                    f"privacy ledger {path} does not exist; the site does not run without "
                    "it. If it was moved or deleted, restore it (a new ledger would forget "
                    "every release so far); for a new site, create it once with: fediim "
                    f"ledger init --site-config {self.config_path}")
            try:
                self._ledger = PrivacyLedger.open(path, self.cfg.budget.rho, self.cfg.site_id)
            except (LedgerError, ValueError, OSError) as exc:
                raise _Refusal(ReplyCode.LEDGER_ERROR, f"privacy ledger unusable: {exc}") \
                    from None
        return self._ledger

    def ledger_view(self) -> LedgerView:
        """The ledger summary reported to the coordinator (as ``PrivacyLedger.summary``
        without the local path), (epsilon, delta) at the site's budget delta."""
        ledger, delta = self.ledger, self.cfg.budget.delta
        return LedgerView(releases=len(ledger.entries), rho_budget=ledger.rho_budget,
                          rho_spent=ledger.spent_rho, rho_remaining=ledger.remaining_rho,
                          delta=delta, epsilon_spent=_epsilon(ledger.spent_rho, delta),
                          epsilon_budget=_epsilon(ledger.rho_budget, delta),
                          insecure_noise=ledger.insecure_noise)

    def ledger_view_if_open(self) -> LedgerView | None:
        """The ledger summary if the ledger was opened (to report a spend already charged
        when a stage fails unexpectedly), else None; never raises."""
        if self._ledger is None:
            return None
        try:
            return self.ledger_view()
        except Exception:  # noqa: BLE001 - only used while reporting another failure
            return None

    def plan(self, epsilon: float, fields: PlanFields) -> PrivacyPlan:
        """This site's privacy plan for a spend of ``epsilon`` at the site's own delta."""
        n_features = len(self.schema.columns)
        try:
            return _plan(epsilon, self.cfg.budget.delta, n_features, fields.plan_params())
        except ValueError as exc:
            raise _Refusal(ReplyCode.BAD_REQUEST, f"invalid privacy request: {exc}") from None

    def check_budget_rules(self, request: PrivacyRequest) -> None:
        """The site's own rules on a spend: its delta, its per-run cap, its seeded-noise
        setting."""
        budget = self.cfg.budget
        if request.seed >= 0 and not self.cfg.insecure_seeded_noise:
            raise _Refusal(ReplyCode.SEEDED_NOISE_REFUSED,
                           "the coordinator asks for seeded (simulation-only) noise, which a "
                           "known seed makes removable; this site does not allow it "
                           "(insecure_seeded_noise = false)")
        if request.delta != budget.delta:
            raise _Refusal(ReplyCode.DELTA_MISMATCH,
                           f"the request is at delta={request.delta!r}, the site's budget at "
                           f"delta={budget.delta!r}; refusing to convert at another delta")
        cap = budget.max_epsilon_per_run
        if cap is not None and request.epsilon > cap:
            raise _Refusal(ReplyCode.RUN_CAP_EXCEEDED,
                           f"the request asks for epsilon={request.epsilon:g}, above this "
                           f"site's max_epsilon_per_run={cap:g}")

    def check_request(self, request: PrivacyRequest) -> tuple[Table, PrivacyPlan]:
        """Everything handshake and release check, in order; returns (table, plan)."""
        self.check_schema(request.schema_hash)
        self.check_key(request.coordinator_key_id)
        self.check_budget_rules(request)
        view = self.ledger_view()
        table = self.table()
        plan = self.plan(request.epsilon, request)
        if not self.ledger.can_afford(plan.rho_total):
            raise _Refusal(
                ReplyCode.INSUFFICIENT_BUDGET,
                f"insufficient privacy budget: this fit needs rho={plan.rho_total:.6g} "
                f"(epsilon={request.epsilon:g} at delta={self.cfg.budget.delta:g}) but only "
                f"rho={self.ledger.remaining_rho:.6g} of {self.ledger.rho_budget:.6g} remains",
                view)
        return table, plan


# -- stages ---------------------------------------------------------------------------------


def _handshake(site: _Site, request: HandshakeRequest, run_id: int,
               state: RecordDict) -> HandshakeReply:
    _, plan = site.check_request(request)
    state[HANDSHAKE_RECORD] = handshake_record(request, run_id)
    log.info("site %s: handshake accepted (rho %.6g of remaining %.6g)", site.site_id,
             plan.rho_total, site.ledger.remaining_rho)
    return HandshakeReply(site_id=site.site_id, rho_requested=plan.rho_total,
                          ledger=site.ledger_view(),
                          site_signature=_handshake_signature(site, request, run_id),
                          secagg=handshake_keys(site, request, run_id, plan, state))


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
                       f"be used: {exc}") from None
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
    mask = bank.site.astype(str) == site_id
    digest = hashlib.sha256()
    digest.update("\n".join(bank.cell[mask].astype(str).tolist()).encode("utf-8"))
    for array in (bank.lo[mask], bank.hi[mask], bank.gram[mask], bank.sigma[mask],
                  bank.clip_lo[mask], bank.clip_hi[mask], bank.observed[mask]):
        digest.update(np.ascontiguousarray(array, dtype=np.float64).tobytes())
    return digest.hexdigest()


def _release_inputs(schema: TableSchema, values: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """What :func:`site_release` gets: the table and its public bounds, coded columns
    encoded as ``FederatedIIM(column_kinds=...)`` encodes them (one-hot blocks in public
    coordinates, never narrowed by a data-derived clipping box; the release's Δ is then
    :func:`~fediim.federated.release.coded_gram_sensitivity`)."""
    columns = release_columns(schema)
    coded = {} if columns.encoding is None else {"clip_columns": columns.clip_columns,
                                                 "onehot_blocks": columns.onehot_blocks}
    return columns.encode(values), columns.bounds, coded


def _release(site: _Site, request: ReleaseRequest, run_id: int,
             state: RecordDict) -> ReleaseReply:
    table, plan = site.check_request(request)
    noise = None
    if request.seed >= 0:
        if request.seed_index < 0:
            raise _Refusal(ReplyCode.BAD_REQUEST, "seeded noise needs a seed_index >= 0")
        noise = SeededGaussianNoise(
            np.random.SeedSequence(request.seed, spawn_key=(request.seed_index,)))
    values, bounds, coded = _release_inputs(site.schema, table.values)
    try:
        bank = site_release(values, bounds, plan, site_id=site.site_id, ledger=site.ledger,
                            noise=noise, **coded)
    except (BudgetExceeded, LedgerError) as exc:
        raise spending_refusal(exc, site.ledger_view()) from None
    state[STATE_RECORD] = ConfigRecord({
        "run_id": int(run_id), "site_id": site.site_id, "imputed": False,
        "cells_sha256": _cells_digest(bank, site.site_id), "n_cells": bank.n_cells,
        "epsilon": float(request.epsilon), **request.plan_fields(),
    })
    log.info("site %s: released %d cells (rho spent %.6g of %.6g)", site.site_id, bank.n_cells,
             site.ledger.spent_rho, site.ledger.rho_budget)
    return ReleaseReply(site_id=site.site_id, bank=bank.to_bytes(), n_cells=bank.n_cells,
                        ledger=site.ledger_view())


def _write_outputs(out: Path, result: ImputationResult, schema: TableSchema,
                   request: ImputeRequest, run_id: int) -> None:
    """All outputs staged and committed together: every file is written, or none is."""
    with atomic_outputs() as outputs:
        with outputs.open(out / "bank.npz", "wb") as fh:
            fh.write(request.bank)
        with outputs.open(out / "bank.sig.json", newline="") as fh:
            fh.write(signature_json(request.signature, request.bank, request.schema_hash,
                                    run_id, request.coordinator_key_id))
        columns = schema.column_names
        with outputs.open(out / "flags.csv", newline="") as fh:
            write_flags(fh, result, columns, schema)
        with outputs.open(out / "audit.jsonl", newline="") as fh:
            dump_audit_jsonl(fh, audit_records(result, columns, k=request.k,
                                               levels=schema.column_levels()))
        with outputs.open(out / "imputed.csv", newline="") as fh:
            write_table(fh, result.values, columns, schema)


def _claim_run(site: _Site, run_id: int, state: RecordDict) -> ConfigRecord:
    """This run's release record, marked as used: an impute is answered once per release,
    and only in the run of that release (else a NOT_IN_RUN refusal)."""
    released = state.config_records.get(STATE_RECORD)
    if released is None or int(released["run_id"]) != int(run_id):
        raise _Refusal(ReplyCode.NOT_IN_RUN, f"an impute in run {run_id}, where this site "
                       "released nothing; refused")
    if released["site_id"] != site.site_id or bool(released["imputed"]):
        raise _Refusal(ReplyCode.NOT_IN_RUN, f"a second impute in run {run_id} (or under "
                       "another site id); refused")
    released["imputed"] = True
    return released


def _verified_bank(site: _Site, request: ImputeRequest, run_id: int,
                   released: ConfigRecord) -> ModelBank:
    """The federation bank, once its signature verifies under the pinned key, it fits this
    run's privacy plan as a whole and carries this site's cells as released; else refuse.
    Nothing here reads the site's records, so the outcome cannot depend on them."""
    site.check_schema(request.schema_hash)
    public_key = site.check_key(request.coordinator_key_id)
    try:
        verify_bank(public_key, request.signature, request.bank, request.schema_hash, run_id)
    except SignatureError as exc:
        raise _Refusal(ReplyCode.BAD_SIGNATURE, str(exc)) from None
    # A record written before a field existed holds its default.
    fields = PlanFields.model_validate({name: released[name] for name in PlanFields.model_fields
                                        if name in released})
    plan = site.plan(float(released["epsilon"]), fields)
    limits = ReleaseLimits.from_plan(plan, encoded_width(site.schema))
    try:
        bank = ModelBank.from_bytes(request.bank, source="the federation bank")
        if "aggregation" in released:  # a secure run: the sum this site took part in
            problems = secure_bank_problems(bank, released, plan, release_columns(site.schema))
        else:
            problems = bank_problems(bank, limits)
        if not problems and "aggregation" not in released and _cells_digest(
                bank, site.site_id) != released["cells_sha256"]:
            problems = ["it does not carry this site's cells as the site released them"]
    except Exception as exc:  # noqa: BLE001 - whatever a crafted bank provokes is a bad bank
        problems = [f"{type(exc).__name__}: {exc}"]
    if problems:
        raise _Refusal(ReplyCode.BAD_BANK, "the bank is refused: " + "; ".join(problems))
    return bank


def _imputed_from_bank(site: _Site, table: Table, bank: ModelBank,
                       request: ImputeRequest) -> ImputationResult:
    """The site's records imputed from a vetted bank; on ANY failure from the bank (or a
    non-finite value), the site's own IIM for every cell, marked ``fallback``: a crafted
    bank must not turn the reply into a signal about the records."""
    # Imported here, in the one round that imputes: the engine loads scikit-learn and scipy,
    # and the ClientApp starts a new process for every message.
    from fediim.federated.site_imputation import local_fallback, site_impute

    encoding = schema_encoding(site.schema)
    values, bounds, _ = _release_inputs(site.schema, table.values)
    try:
        result = site_impute(values, bank, bounds, mode=request.mode,
                             n_neighbors=request.k, site_id=site.site_id)
        if encoding is not None:  # codes of declared levels, with their probabilities
            result = encoding.decode(result, table.values)
        if np.isfinite(result.values[result.imputed]).all():
            return result
        failure = "a non-finite value"
    except Exception as exc:  # noqa: BLE001 - whatever the bank provokes stays local
        failure = f"{type(exc).__name__}: {exc}"
    log.warning("site %s: imputation from the bank failed (%s); the site's own IIM fills "
                "every cell", site.site_id, failure)
    return local_fallback(table.values, request.k)


def _impute(site: _Site, request: ImputeRequest, run_id: int, state: RecordDict) -> ImputeReply:
    released = _claim_run(site, run_id, state)
    view = site.ledger_view()  # no ledger, no stage: before anything is written
    bank = _verified_bank(site, request, run_id, released)
    _store_receipt(site, request, run_id)
    table = site.table()
    result = _imputed_from_bank(site, table, bank, request)
    apply_schema(result, site.schema, site.schema.column_names)
    if not np.isfinite(result.values[result.imputed]).all():
        raise _Refusal(ReplyCode.ERROR, "imputation produced a non-finite value; nothing was "
                       "written")
    try:
        _write_outputs(site.cfg.output_dir, result, site.schema, request, run_id)
    except OSError as exc:
        raise _Refusal(ReplyCode.ERROR, f"cannot write the outputs ({exc}); nothing was "
                       "written") from None
    log.info("site %s: imputed %d cells in %d of %d rows (%d by the local fallback) -> %s",
             site.site_id, int(result.imputed.sum()), int(result.imputed.any(axis=1).sum()),
             table.n_rows, int((result.method == METHOD_FALLBACK).sum()),
             site.cfg.output_dir)
    return ImputeReply(site_id=site.site_id, ledger=view)


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


def _answer(site: _Site,
            request: HandshakeRequest | ReleaseRequest | SecureRequest | ImputeRequest,
            run_id: int, state: RecordDict
            ) -> HandshakeReply | ReleaseReply | SecureReply | ImputeReply:
    """The stage function of ``request``'s stage."""
    if isinstance(request, HandshakeRequest):
        return _handshake(site, request, run_id, state)
    if isinstance(request, ReleaseRequest):
        return _release(site, request, run_id, state)
    if isinstance(request, SecureRequest):
        return answer_secure(site, request, run_id, state)
    return _impute(site, request, run_id, state)


def handle(content: RecordDict, *, node_config: dict[str, Any], run_id: int, node_id: int,
           state: RecordDict, run_config: dict[str, Any] | None = None) -> RecordDict:
    """Answer one request record with one reply record (never raises for a bad request).

    The reply carries a code, never the details: those go to the site's log.
    """
    started = REPLY_CLOCK.monotonic()
    site_id = f"node-{node_id}"
    try:
        stage = request_stage(content)
    except MessageError as exc:
        log.warning("site %s: unreadable request: %s", site_id, exc)
        return HandshakeReply(site_id=site_id, code=ReplyCode.BAD_REQUEST).to_record()
    reply_model = reply_type(stage)
    site: _Site | None = None
    try:
        request = parse_request(content)
        site = _Site(site_config_path(node_config, run_config or {}), node_id)
        site_id = site.site_id
        reply = _answer(site, request, run_id, state)
    except MessageError as exc:
        log.warning("site %s: invalid %s request: %s", site_id, stage, exc)
        reply = reply_model(site_id=site_id, code=ReplyCode.BAD_REQUEST)
    except _Refusal as exc:
        log.warning("site %s: %s refused (%s): %s", site_id, stage, exc.code, exc.detail)
        reply = reply_model(site_id=site_id, code=exc.code, ledger=exc.ledger)
    except Exception:  # noqa: BLE001 - a site must answer, not crash; details stay local
        log.exception("site %s: %s failed", site_id, stage)
        reply = reply_model(site_id=site_id, code=ReplyCode.ERROR,
                            ledger=site.ledger_view_if_open() if site is not None else None)
    sleep_to_quantum(REPLY_CLOCK, started, site.reply_time_quantum() if site else 0.0)
    return reply.to_record()
