"""A site's secure rounds: its keys, its noised and masked shares, its unmasking shares.

A secure run (see :mod:`coordinator.secure`) asks a site, after the handshake, to
advertise its keys, share them, then per statistic to compute its noised share over the
public state the coordinator sends (charged to its ledger first), mask it, and help unmask
the sum; the first statistic's share is asked with key sharing (and, if that early input
cannot be summed, asked again: the same share is masked again, not drawn or charged
twice). The site refuses (:data:`ReplyCode.SECURE_REFUSED`, before anything is released) a
request whose plan, seed or spend differs from the handshake's, a run shape other than
the one it advertised keys for, a session out of order, a public state that is not a
partition of the box (:func:`~fediim.protocol.secure_run.decode_public_state`), whose box
narrows a coded column or whose grams are over another box or depth than its counts, a
vector length other than its schema's encoding gives over that state, and whatever the
protocol refuses. Coded columns are summed as the per-site release encodes them
(:func:`~fediim.impute.encoding.release_columns`): one-hot blocks in public coordinates,
no clipping histograms.

Per-run state (``context.state``, kept in the SuperNode's memory for the run; never sent,
never written to disk or logged): the handshake's request, the protocol state with its
secrets (:meth:`SiteSecureAggregator.to_bytes`), the seeded noise stream's position (in
simulations), the first statistic's share while it may be asked again, and the public
state of the counts.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Protocol

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from fediim.errors import BudgetExceeded, LedgerError, MessageError, SigningKeyError
from fediim.federated.bank import ModelBank
from fediim.federated.plan import PrivacyPlan, scale_to_bounds
from fediim.federated.secure_release import (
    SecureSettings,
    SecureSteps,
    SiteShares,
    gram_sum_sigma,
)
from fediim.federated.vetting import bank_problems
from fediim.impute.encoding import ReleaseColumns, release_columns
from fediim.io.schema import TableSchema
from fediim.io.table import Table
from fediim.privacy import PrivacyLedger, SeededGaussianNoise
from fediim.protocol.identity import load_site_private_key, load_site_registry
from fediim.protocol.messages import (
    HandshakeRequest,
    LedgerView,
    PrivacyRequest,
    ReplyCode,
    SecureReply,
    SecureRequest,
)
from fediim.protocol.run_config import PlanFields
from fediim.protocol.secure_run import (
    MAX_ABS_PER_SITE,
    PublicState,
    decode_public_state,
    secure_limits,
    session_statistics,
    tree_cells_problems,
)
from fediim.protocol.secure_sum import (
    MaskedInputRequest,
    SecureAggregationError,
    SecureSumConfig,
    ShareDelivery,
    SiteSecureAggregator,
    UnmaskRequest,
)
from fediim.protocol.secure_sum.messages import AdvertisementBroadcast
from fediim.protocol.site_config import SiteConfig
from site_client.refusal import Refusal, spending_refusal

__all__ = ["HANDSHAKE_RECORD", "SECURE_RECORD", "answer_secure", "handshake_keys",
           "handshake_record", "secure_bank_problems"]

log = logging.getLogger("flwr.fediim.site")

#: ``context.state`` record of the run's handshake request (what a secure round must match).
HANDSHAKE_RECORD = "fediim.handshake"
#: ``context.state`` record of the site's secure-sum state (secrets: memory only).
SECURE_RECORD = "fediim.secure"
#: ``context.state`` record of what the site released in the run (see site.py).
RELEASE_RECORD = "fediim.site"


class SecureSite(Protocol):
    """What a secure round needs of the site (:class:`site_client.site._Site`)."""

    site_id: str
    cfg: SiteConfig
    schema: TableSchema
    ledger: PrivacyLedger

    def ledger_view(self) -> LedgerView: ...
    def ledger_view_if_open(self) -> LedgerView | None: ...
    def check_request(self, request: PrivacyRequest) -> tuple[Table, PrivacyPlan]: ...
    def plan(self, epsilon: float, fields: PlanFields) -> PrivacyPlan: ...
    def table(self) -> Table: ...


def handshake_record(request: PrivacyRequest, run_id: int) -> ConfigRecord:
    """What the handshake asked (schema, coordinator key, spend, seed, plan), for the
    secure rounds to match."""
    return ConfigRecord({"run_id": int(run_id), "schema_hash": request.schema_hash,
                         "coordinator_key_id": request.coordinator_key_id,
                         "epsilon": float(request.epsilon),
                         "seed": int(request.seed), **request.plan_fields()})


def _check_handshake(request: SecureRequest, run_id: int, state: RecordDict) -> None:
    record = state.config_records.get(HANDSHAKE_RECORD)
    asked = handshake_record(request, run_id)
    if record is None or dict(record) != dict(asked):
        raise SecureAggregationError("a secure round whose spend, seed or plan is not the "
                                     "handshake's in this run (or without a handshake)")


def answer_secure(site: SecureSite, request: SecureRequest, run_id: int,
                  state: RecordDict) -> SecureReply:
    """The site's reply to one secure round (see module docstring)."""
    try:
        _check_handshake(request, run_id, state)
        plan = site.check_request(request)[1] if request.step == "advertise" else None
        return _step(site, request, run_id, state, plan)
    except (BudgetExceeded, LedgerError) as exc:
        view = (site.ledger_view() if isinstance(exc, BudgetExceeded)
                else site.ledger_view_if_open())
        raise spending_refusal(exc, view) from None
    except (SecureAggregationError, MessageError, ValueError) as exc:
        raise Refusal(ReplyCode.SECURE_REFUSED, f"secure round {request.step}: {exc}",
                      site.ledger_view_if_open()) from None


def _step(site: SecureSite, request: SecureRequest, run_id: int, state: RecordDict,
          plan: PrivacyPlan | None) -> SecureReply:
    """Dispatch on the step; the protocol state is saved back after every step. Only
    the steps that may spend (advertise checks the budget, masked input charges) read the
    plan and report the ledger: the unmask replies, and key sharing without the first
    session's input, leave it out."""
    ledger = request.step in ("advertise", "masked_input") or request.first_input is not None
    first: bytes | None = None
    if request.step == "advertise":
        aggregator = _new_aggregator(site, request, run_id, plan or site.plan(
            request.epsilon, request))
        record = ConfigRecord({"run_id": int(run_id), "noise_state": "", "counts_state": b""})
        message = aggregator.advertise().encode()
    else:
        record = state.config_records.get(SECURE_RECORD)
        if record is None or int(record["run_id"]) != int(run_id):
            raise SecureAggregationError("a secure round before this site advertised keys")
        aggregator = _aggregator(site, record, tuple(request.sites))
        _check_shape(aggregator.config, request)
        if request.step == "share_keys":
            message = aggregator.share_keys(
                AdvertisementBroadcast.decode(request.secagg or b"")).encode()
            if request.first_input is not None:
                first = _masked_input(site, request, run_id, aggregator, record, state,
                                      MaskedInputRequest.decode(request.first_input))
        elif request.step == "masked_input":
            message = _masked_input(site, request, run_id, aggregator, record, state,
                                    MaskedInputRequest.decode(request.secagg or b""))
        else:
            message = _unmask(request, aggregator, state)
    record["aggregator"] = aggregator.to_bytes()
    state[SECURE_RECORD] = record
    return SecureReply(site_id=site.site_id, secagg=message, first_input=first,
                       ledger=site.ledger_view() if ledger else None)


def _identity(site: SecureSite, sites: list[str]) -> tuple[Any, dict[str, Any]]:
    """The site's identity key and every run site's registered public key."""
    if site.cfg.site_key is None or site.cfg.site_registry is None:
        raise Refusal(ReplyCode.BAD_CONFIG, "secure aggregation needs the site's site_key and "
                      "a site_registry of every site's public key in its TOML")
    try:
        key = load_site_private_key(site.cfg.site_key)
        registry = load_site_registry(site.cfg.site_registry)
    except (SigningKeyError, ValueError) as exc:
        raise Refusal(ReplyCode.BAD_CONFIG, f"secure aggregation keys: {exc}") from None
    public = {s: registry.public_key(s) for s in sites}
    missing = sorted(s for s, k in public.items() if k is None)
    if missing:
        raise SecureAggregationError(f"sites {missing} are not in this site's registry")
    return key, public


def _new_aggregator(site: SecureSite, request: SecureRequest, run_id: int,
                    plan: PrivacyPlan) -> SiteSecureAggregator:
    n_sessions = len(session_statistics(plan, _clip(site)))
    if request.n_sessions != n_sessions:
        raise SecureAggregationError(f"the plan makes {n_sessions} sums, not "
                                     f"{request.n_sessions}")
    config = SecureSumConfig(run_id=int(run_id), sites=tuple(request.sites),
                             threshold=request.threshold,
                             vector_lengths=(None,) * n_sessions,
                             max_abs_per_site=MAX_ABS_PER_SITE)
    key, registry = _identity(site, request.sites)
    return SiteSecureAggregator(config, site.site_id, key, registry)


def _aggregator(site: SecureSite, record: ConfigRecord,
                sites: tuple[str, ...]) -> SiteSecureAggregator:
    """The site's protocol state, for the run's ``sites`` (keys advertised with the
    handshake were for every registered site)."""
    config = json.loads(bytes(record["aggregator"]))["config"]
    key, registry = _identity(site, config["sites"])
    return SiteSecureAggregator.from_bytes(record["aggregator"], key, registry, sites)


def handshake_keys(site: SecureSite, request: HandshakeRequest, run_id: int,
                   plan: PrivacyPlan, state: RecordDict) -> bytes | None:
    """The site's signed key advertisement for a handshake that asks for keys (for every
    site of its registry: the run's sites are not known yet), or None when it asks none or
    the site cannot (no site key or registry, another number of sums); the state is kept
    for the secure rounds."""
    if request.secure_threshold < 2 or site.cfg.site_key is None or (
            site.cfg.site_registry is None):
        return None
    try:
        n_sessions = len(session_statistics(plan, _clip(site)))
        sites = tuple(sorted(load_site_registry(site.cfg.site_registry).keys))
        if n_sessions != request.secure_sessions or site.site_id not in sites:
            return None
        key, registry = _identity(site, list(sites))
        aggregator = SiteSecureAggregator(
            SecureSumConfig(run_id=int(run_id), sites=sites,
                            threshold=request.secure_threshold,
                            vector_lengths=(None,) * n_sessions,
                            max_abs_per_site=MAX_ABS_PER_SITE), site.site_id, key, registry)
    except (SecureAggregationError, Refusal, ValueError) as exc:
        log.warning("site %s: no secure-aggregation keys at the handshake: %s", site.site_id,
                    exc)
        return None
    state[SECURE_RECORD] = ConfigRecord({"run_id": int(run_id), "noise_state": "",
                                         "counts_state": b"",
                                         "aggregator": aggregator.to_bytes()})
    return aggregator.advertise().encode()


def _check_frame(state: PublicState, coded: np.ndarray, plan: PrivacyPlan,
                 clip: np.ndarray) -> None:
    """A frame only where the plan's first sum is the moments, and one that keeps the coded
    columns in the public coordinates (identity rows and columns, no offset)."""
    wants = SecureSteps.from_plan(plan).first_statistic(clip) == "moments"
    if state.box is None:
        return
    if (state.frame is not None) != wants:
        raise ValueError("the public state's frame does not match the plan's axes")
    if state.frame is None:
        return
    matrix, offset = state.frame.matrix, state.frame.offset
    identity = np.eye(len(offset))
    if not (np.array_equal(matrix[coded], identity[coded])
            and np.array_equal(matrix[:, coded], identity[:, coded])
            and np.all(offset[coded] == 0.0)):
        raise ValueError("the public frame mixes a coded column")


def _check_shape(config: SecureSumConfig, request: SecureRequest) -> None:
    if (tuple(request.sites), request.threshold, request.n_sessions) != (
            config.sites, config.threshold, config.n_sessions):
        raise SecureAggregationError("the run's sites, threshold or number of sums changed "
                                     "since this site advertised its keys")


def _clip(site: SecureSite) -> np.ndarray:
    """The released columns with clipping histograms (the numeric ones)."""
    return release_columns(site.schema).clip_columns


def _noise(request: SecureRequest, record: ConfigRecord) -> SeededGaussianNoise | None:
    """The site's seeded noise stream (simulations), continued where it stopped."""
    if request.seed < 0:
        return None
    if request.seed_index < 0:
        raise ValueError("seeded noise needs a seed_index >= 0")
    noise = SeededGaussianNoise(np.random.SeedSequence(request.seed,
                                                       spawn_key=(request.seed_index,)))
    if record["noise_state"]:
        noise.state = json.loads(str(record["noise_state"]))
    return noise


def _shares(site: SecureSite, request: SecureRequest, plan: PrivacyPlan, session: int,
            noise: SeededGaussianNoise | None) -> SiteShares:
    """The site's records as the sums see them; the first sum first refuses a plan the
    ledger cannot pay in full (later sums find part of it already paid)."""
    settings = SecureSettings(len(request.sites), request.threshold)
    columns = release_columns(site.schema)
    values = columns.encode(site.table().values)
    if session == 0:
        return SiteShares.from_table(values, columns.bounds, plan, settings,
                                     site_id=site.site_id, ledger=site.ledger, noise=noise,
                                     clip_columns=columns.clip_columns,
                                     onehot_blocks=columns.onehot_blocks)
    rows, _ = scale_to_bounds(values[~np.isnan(values).any(axis=1)], columns.bounds)
    return SiteShares(rows, plan, settings, columns.clip_columns, site.site_id, site.ledger,
                      noise, tuple(tuple(block) for block in columns.onehot_blocks))


def _public_state(site: SecureSite, request: SecureRequest, plan: PrivacyPlan,
                  statistic: str, record: ConfigRecord) -> PublicState:
    """The state ``statistic`` is computed over, refused unless it is what the statistic
    needs: nothing, a box and depth (and the principal-axis frame iff the plan cuts along
    one), or the trees of the counts' box, depth and frame; a box and frame that leave the
    coded columns whole (a narrower box or a frame that mixes them would move a record's
    zero indicators off zero, beyond the one-hot sensitivity)."""
    columns = release_columns(site.schema)
    state = decode_public_state(request.public_state, columns.width, plan.n_trees)
    coded = ~columns.clip_columns
    if state.box is not None and not (np.all(state.box[0][coded] == -0.5)
                                      and np.all(state.box[1][coded] == 0.5)):
        raise ValueError("the public box narrows a coded column")
    _check_frame(state, coded, plan, _clip(site))
    if statistic in ("histograms", "moments") and state.box is None:
        return state
    if statistic == "counts" and state.box is not None and not state.trees:
        return state
    counts = (PublicState(state.box, state.depth, frame=state.frame).encode()
              if state.box is not None else b"")
    if statistic == "grams" and state.trees and counts == bytes(record["counts_state"]):
        return state
    raise ValueError(f"the public state is not what the {statistic} sum is computed over")


def _masked_input(site: SecureSite, request: SecureRequest, run_id: int,
                  aggregator: SiteSecureAggregator, record: ConfigRecord, state: RecordDict,
                  masked_request: MaskedInputRequest) -> bytes:
    """Check the request and the public state, then compute (charged), noise and mask.
    The first session asked again (after its early input went unused) masks the same
    input again: nothing new is computed, drawn or charged."""
    if request.delivery:
        aggregator.receive_shares(ShareDelivery.decode(request.delivery))
    plan = site.plan(request.epsilon, request)
    session = aggregator.check_masked_input_request(masked_request)
    clip = _clip(site)
    statistic = session_statistics(plan, clip)[session]
    public = _public_state(site, request, plan, statistic, record)
    length = public.vector_length(statistic, clip, plan.n_trees)
    if masked_request.length != length:  # refused before anything is computed or charged
        raise ValueError(f"a {statistic} vector of {masked_request.length} entries; this "
                         f"site's schema encoding gives {length} over the public state")
    early = bytes(record.get("first_input", b"")) if session == 0 else b""
    if early:
        return aggregator.masked_input(masked_request,
                                       np.frombuffer(early, dtype="<i8")).encode()
    noise = _noise(request, record)
    shares = _shares(site, request, plan, session, noise)
    vector = shares.share(statistic, SecureSteps.from_plan(plan), public.box, public.depth,
                          public.trees, public.frame)
    if request.step == "share_keys":  # kept (in memory) in case the session is asked again
        record["first_input"] = np.asarray(vector, dtype="<i8").tobytes()
    if statistic == "counts":
        record["counts_state"] = public.encode()
    elif statistic == "grams":
        state[RELEASE_RECORD] = _release_record(site, request, run_id, public)
    if noise is not None:
        record["noise_state"] = json.dumps(noise.state)
    return aggregator.masked_input(masked_request, vector).encode()


def _release_record(site: SecureSite, request: SecureRequest, run_id: int,
                    public: PublicState) -> ConfigRecord:
    """What the impute checks the bank against: this run's trees and summands."""
    return ConfigRecord({
        "run_id": int(run_id), "site_id": site.site_id, "imputed": False,
        "aggregation": "secure", "public_state": public.encode(), "n_sites": len(request.sites),
        "threshold": request.threshold, "n_summands": 0, "epsilon": float(request.epsilon),
        **request.plan_fields()})


def _unmask(request: SecureRequest, aggregator: SiteSecureAggregator,
            state: RecordDict) -> bytes:
    if request.delivery:  # the first session's inputs rode with key sharing
        aggregator.receive_shares(ShareDelivery.decode(request.delivery))
    unmask = UnmaskRequest.decode(request.secagg or b"")
    reply = aggregator.unmask(unmask).encode()
    released = state.config_records.get(RELEASE_RECORD)
    if unmask.session == aggregator.config.n_sessions - 1 and released is not None:
        released["n_summands"] = len(unmask.survivors)  # the Gram sum's survivors
    return reply


def secure_bank_problems(bank: ModelBank, released: ConfigRecord, plan: PrivacyPlan,
                         columns: ReleaseColumns) -> list[str]:
    """Why ``bank`` is not the secure sum this site took part in: the plan's limits for a
    sum over this run's sites and summands (over the released ``columns``, one-hot blocks
    at their sensitivity), and cells that are the run's leaves."""
    n_summands = int(released["n_summands"])
    if n_summands < int(released["threshold"]):
        return ["this site did not help unmask the run's Gram sum"]
    public = decode_public_state(released["public_state"], columns.width, plan.n_trees)
    settings = SecureSettings(int(released["n_sites"]), int(released["threshold"]))
    sigma = gram_sum_sigma(SecureSteps.from_plan(plan), settings, public.trees, n_summands,
                           columns.onehot_blocks)
    limits = secure_limits(plan, columns.width, sigma, settings.n_sites)
    return bank_problems(bank, limits) + tree_cells_problems(bank, public.trees)

