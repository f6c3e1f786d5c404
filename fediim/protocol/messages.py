"""The messages between the coordinator (ServerApp) and the sites (ClientApps), defined once.

Every message is a pydantic model and travels as a Flower ``RecordDict``:

- ``"fediim.config"`` (``ConfigRecord``): every scalar field (str, int, float, bool, list of
  str), plus ``protocol`` and ``stage``;
- ``"fediim.arrays"`` (``ArrayRecord``): every ``bytes`` field (the serialised model bank,
  the bank's signature) as a flat ``uint8`` array;
- ``"fediim.ledger"`` (``MetricRecord``): a site's ledger summary (:class:`LedgerView`), in a
  reply.

A run has three stages, each one request from the coordinator and one reply per site:

1. ``handshake``: the coordinator announces the schema hash, its signing-key id and the
   privacy spend it asks for (epsilon, delta and the partition parameters). The site checks
   them against its own schema, its pinned coordinator key and its own ledger, and accepts or
   refuses with a :class:`ReplyCode` and a reason. Nothing is spent.
2. ``release``: the same parameters again (the site re-checks everything: a ClientApp is a new
   process per message); the site runs ``site_release`` (charged to its on-disk ledger first)
   and replies with its cells (``ModelBank.to_bytes``) and its ledger summary.
3. ``impute``: the signed federation bank; the site verifies the signature with the
   coordinator public key named in its own configuration, vets the bank against the run's
   privacy plan, imputes its own records locally, writes its outputs and replies with a
   status only.

In a secure run (``aggregation``) the release is replaced by ``secure`` rounds
(:class:`SecureRequest`, :class:`SecureReply`; :mod:`fediim.protocol.secure_run`): the
handshake may ask the site for its secure-sum keys, which it advertises in its reply.

What a reply may carry besides the accounted release (a release's cells and the ledger
summary, both public once charged): a :class:`ReplyCode` and the fixed reason text of that
code (:data:`REPLY_REASONS`). Nothing computed from the site's records (no counts, no line
or column of a bad cell, no exception text) ever travels: an impute reply could otherwise
be queried again and again without being charged. Details stay in the site's own log.

``seed`` (>= 0) asks sites for seeded numpy noise instead of OpenDP's exact sampler. It is
for reproducible simulations only: whoever knows the seed can subtract the noise, so a site
refuses it unless its own configuration says ``insecure_seeded_noise = true``; its ledger
then marks every such release, and :class:`LedgerView` reports ``insecure_noise``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar, Literal, Self

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fediim.errors import MessageError
from fediim.federated.plan import Mode
from fediim.io.validation import format_validation_error
from fediim.protocol.run_config import RUN_CONFIG_DEFAULTS, Delta, Epsilon, PlanFields

__all__ = [
    "CONFIG_RECORD",
    "ARRAYS_RECORD",
    "LEDGER_RECORD",
    "MESSAGE_TYPE",
    "PROTOCOL",
    "RUN_CONFIG_DEFAULTS",
    "STAGES",
    "HandshakeReply",
    "HandshakeRequest",
    "ImputeReply",
    "ImputeRequest",
    "LedgerView",
    "MessageError",
    "PrivacyRequest",
    "REPLY_REASONS",
    "ReleaseReply",
    "ReleaseRequest",
    "ReplyCode",
    "SECURE_STEPS",
    "SecureReply",
    "SecureRequest",
    "parse_request",
    "reply_type",
    "request_stage",
]

PROTOCOL = "fediim-flower/1"
STAGES = ("handshake", "release", "secure", "impute")
#: Flower message type of every fediim message (handled by the ClientApp's ``@app.query()``).
MESSAGE_TYPE = "query"
CONFIG_RECORD = "fediim.config"
ARRAYS_RECORD = "fediim.arrays"
LEDGER_RECORD = "fediim.ledger"
# RUN_CONFIG_DEFAULTS (declared in fediim.protocol.run_config) and MessageError (in
# fediim.errors) are re-exported here for the apps' convenience.


class ReplyCode(StrEnum):
    """Why a site accepted, refused or failed a stage."""

    OK = "ok"
    SCHEMA_MISMATCH = "schema_mismatch"
    INSUFFICIENT_BUDGET = "insufficient_budget"
    DELTA_MISMATCH = "delta_mismatch"
    RUN_CAP_EXCEEDED = "run_cap_exceeded"
    BAD_DATA = "bad_data"
    BAD_CONFIG = "bad_config"
    LEDGER_MISSING = "ledger_missing"
    LEDGER_ERROR = "ledger_error"
    KEY_MISMATCH = "key_mismatch"
    BAD_SIGNATURE = "bad_signature"
    NOT_IN_RUN = "not_in_run"
    BAD_BANK = "bad_bank"
    SEEDED_NOISE_REFUSED = "seeded_noise_refused"
    BAD_REQUEST = "bad_request"
    SECURE_REFUSED = "secure_refused"
    ERROR = "error"


#: The one reason text of each code. A reply's reason is always its code's text, so that no
#: reply can carry data-dependent detail; the site logs the details locally.
REPLY_REASONS: dict[ReplyCode, str] = {
    ReplyCode.OK: "",
    ReplyCode.SCHEMA_MISMATCH: "schema mismatch: the site's schema is not the coordinator's "
                               "(columns, order, bounds and missing markers must agree)",
    ReplyCode.INSUFFICIENT_BUDGET: "insufficient privacy budget: the site's ledger cannot "
                                   "afford this run's spend",
    ReplyCode.DELTA_MISMATCH: "the request's delta is not the site's budget delta; the site "
                              "converts every spend at its own delta",
    ReplyCode.RUN_CAP_EXCEEDED: "the request's epsilon exceeds the site's cap for one run",
    ReplyCode.BAD_DATA: "the site cannot read its data table; see the site's log",
    ReplyCode.BAD_CONFIG: "the site's configuration (its TOML, schema or pinned coordinator "
                          "key) is missing or invalid; see the site's log",
    ReplyCode.LEDGER_MISSING: "the site's privacy ledger does not exist; the site runs only "
                              "with its ledger (created once with 'fediim ledger init')",
    ReplyCode.LEDGER_ERROR: "the site's privacy ledger cannot be used or changed during the "
                            "stage; nothing was released; see the site's log",
    ReplyCode.KEY_MISMATCH: "the coordinator's signing key is not the key pinned by this site",
    ReplyCode.BAD_SIGNATURE: "the bank's signature does not verify under the site's pinned "
                             "coordinator key for this run and schema",
    ReplyCode.NOT_IN_RUN: "an impute needs this site's release in the same run, and is "
                          "answered once per run",
    ReplyCode.BAD_BANK: "the bank does not fit this run's privacy plan or does not carry "
                        "this site's cells as released; refused",
    ReplyCode.SEEDED_NOISE_REFUSED: "the coordinator asks for seeded (insecure, simulation "
                                    "only) noise, which this site does not allow",
    ReplyCode.BAD_REQUEST: "the request is malformed or invalid",
    ReplyCode.SECURE_REFUSED: "the secure-aggregation request is inconsistent (a tree that "
                              "is not a partition, a session out of order, another plan or "
                              "site set than the handshake's, a bad key or share); refused "
                              "before releasing anything",
    ReplyCode.ERROR: "the site could not complete the stage; see the site's log",
}


class LedgerView(BaseModel):
    """A site's ledger summary as reported to the coordinator (all public numbers)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    releases: int = Field(ge=0)
    rho_budget: float = Field(ge=0)
    rho_spent: float = Field(ge=0)
    rho_remaining: float = Field(ge=0)
    delta: Delta
    epsilon_spent: float = Field(ge=0)
    epsilon_budget: float = Field(ge=0)
    #: Some release was noised insecurely (seeded simulation noise): the spend is nominal.
    insecure_noise: bool

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> LedgerView:
        """From :meth:`fediim.privacy.PrivacyLedger.summary` (drops the local path)."""
        return cls.model_validate({k: summary[k] for k in cls.model_fields})


class _Message(BaseModel):
    """Base: (de)serialisation to a Flower RecordDict (see module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    STAGE: ClassVar[str]
    protocol: Literal["fediim-flower/1"] = PROTOCOL

    @property
    def stage(self) -> str:
        return self.STAGE

    def to_record(self) -> RecordDict:
        """This message as a Flower ``RecordDict``."""
        config: dict[str, Any] = {"stage": self.STAGE}
        arrays: dict[str, Array] = {}
        ledger: dict[str, int | float] | None = None
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bytes):
                arrays[name] = Array(np.frombuffer(value, dtype=np.uint8).copy())
            elif isinstance(value, LedgerView):  # a MetricRecord holds numbers: bool -> 0/1
                ledger = {key: int(number) if isinstance(number, bool) else number
                          for key, number in value.model_dump().items()}
            elif isinstance(value, StrEnum):
                config[name] = str(value)
            elif isinstance(value, list | tuple):
                config[name] = [str(v) for v in value]
            else:
                config[name] = value
        rd = RecordDict({CONFIG_RECORD: ConfigRecord(config)})
        if arrays:
            rd[ARRAYS_RECORD] = ArrayRecord(arrays)
        if ledger is not None:
            rd[LEDGER_RECORD] = MetricRecord(ledger)
        return rd

    @classmethod
    def from_record(cls, record: RecordDict) -> Self:
        """Parse and validate; :class:`MessageError` says what is wrong."""
        config = _config_of(record)
        stage = config.pop("stage", None)
        if stage != cls.STAGE:
            raise MessageError(f"expected a {cls.STAGE!r} message, got stage {stage!r}")
        fields: dict[str, Any] = dict(config)
        if ARRAYS_RECORD in record.array_records:
            for name, arr in record.array_records[ARRAYS_RECORD].items():
                nd = arr.numpy()
                if nd.dtype != np.uint8 or nd.ndim != 1:
                    raise MessageError(f"{cls.STAGE}: field {name!r} must be a flat uint8 array, "
                                       f"got {nd.dtype} of shape {nd.shape}")
                fields[name] = nd.tobytes()
        if LEDGER_RECORD in record.metric_records:
            fields["ledger"] = dict(record.metric_records[LEDGER_RECORD])
        try:
            return cls.model_validate(fields)
        except ValidationError as exc:
            raise MessageError(format_validation_error(
                exc, f"invalid {cls.STAGE!r} message", multiline=False)) from None


def _config_of(record: RecordDict) -> dict[str, Any]:
    if not isinstance(record, RecordDict) or CONFIG_RECORD not in record.config_records:
        raise MessageError(f"not a fediim message: no {CONFIG_RECORD!r} ConfigRecord")
    config = dict(record.config_records[CONFIG_RECORD])
    protocol = config.get("protocol")
    if protocol != PROTOCOL:
        raise MessageError(f"protocol {protocol!r} is not {PROTOCOL!r}")
    return config


# --------------------------------------------------------------------------- requests


class PrivacyRequest(_Message, PlanFields):
    """What the coordinator asks a site to spend, and how (shared by handshake and release).

    ``epsilon``/``delta`` is this fit's spend at every site (converted to rho-zCDP by
    :func:`fediim.federated.plan_privacy` at the site, always at the site's own budget delta:
    a site refuses a request at another ``delta``); the plan's fields
    (:class:`~fediim.protocol.run_config.PlanFields`) change how the spend is used, never how
    much is spent. ``seed`` >= 0: seeded noise, simulations only.
    """

    STAGE: ClassVar[str] = ""
    schema_hash: str = Field(min_length=64, max_length=64, pattern=r"^[0-9a-f]{64}$")
    coordinator_key_id: str = Field(min_length=1)
    epsilon: Epsilon
    delta: Delta
    seed: int = Field(default=RUN_CONFIG_DEFAULTS["seed"], ge=-1)


class HandshakeRequest(PrivacyRequest):
    """Stage 1: may this site take part, at this spend, under this schema?"""

    STAGE: ClassVar[str] = "handshake"
    # -- site identity (fediim.protocol.identity): a fresh random nonce per run, which the
    # site signs with the run id, its site id and its node id.
    nonce: str = Field(default="", pattern=r"^(?:[0-9a-f]{32,128})?$")
    # -- secure aggregation (fediim.protocol.secure_run): when the run may sum securely,
    # the threshold and number of sums the site may advertise keys for in its reply (saves
    # a round); 0: no keys asked.
    secure_threshold: int = Field(default=0, ge=0)
    secure_sessions: int = Field(default=0, ge=0, le=3)


class ReleaseRequest(PrivacyRequest):
    """Stage 2: release your cells. ``seed_index`` picks this site's seeded noise stream."""

    STAGE: ClassVar[str] = "release"
    seed_index: int = Field(default=-1, ge=-1)


#: The secure rounds' steps, in order (see :mod:`fediim.protocol.secure_sum`).
SECURE_STEPS = ("advertise", "share_keys", "masked_input", "unmask")


class SecureRequest(PrivacyRequest):
    """A secure-aggregation round (secure runs, between handshake and impute): the plan of
    the handshake again (the site refuses another), the run's secure-sum shape (``sites``
    sorted, ``threshold``, ``n_sessions``) and this step's protocol message ``secagg``
    (:mod:`fediim.protocol.secure_sum` bytes). A masked-input step also carries the public
    state its statistic is computed over (``public_state``: box, depth, trees; see
    :mod:`fediim.protocol.secure_run`) and, in the first session, the site's encrypted
    shares (``delivery``). A share-keys step may also ask the first session's masked input
    (``first_input``, a masked-input request over every site that advertised, with its
    ``public_state``); the shares then ride with that session's unmask step.
    ``seed_index`` picks this site's seeded noise stream."""

    STAGE: ClassVar[str] = "secure"
    step: Literal["advertise", "share_keys", "masked_input", "unmask"]
    sites: list[str] = Field(min_length=2)
    threshold: int = Field(ge=2)
    n_sessions: int = Field(ge=1, le=3)
    seed_index: int = Field(default=-1, ge=-1)
    secagg: bytes | None = None
    delivery: bytes | None = None
    public_state: bytes | None = None
    first_input: bytes | None = None


class ImputeRequest(_Message):
    """Stage 3: the signed federation bank; impute your own records locally."""

    STAGE: ClassVar[str] = "impute"
    schema_hash: str = Field(min_length=64, max_length=64, pattern=r"^[0-9a-f]{64}$")
    coordinator_key_id: str = Field(min_length=1)
    bank: bytes = Field(min_length=1)
    signature: bytes = Field(min_length=1)
    mode: Mode = RUN_CONFIG_DEFAULTS["mode"]
    k: int = Field(default=RUN_CONFIG_DEFAULTS["k"], ge=1)
    # -- spend receipt (fediim.protocol.receipts): the coordinator's signed acknowledgement of
    # this site's spend, for the site's receipts file; None for a site it issued none.
    receipt: bytes | None = None
    receipt_signature: bytes | None = None


# --------------------------------------------------------------------------- replies


class _Reply(_Message):
    """A site's answer: its id, a code and, where the stage has one, its ledger summary."""

    STAGE: ClassVar[str] = ""
    site_id: str = Field(min_length=1)
    code: ReplyCode = ReplyCode.OK
    ledger: LedgerView | None = None

    @property
    def ok(self) -> bool:
        return self.code is ReplyCode.OK

    @property
    def reason(self) -> str:
        """The fixed reason text of :attr:`code` (never sent: it follows from the code)."""
        return REPLY_REASONS[self.code]


class HandshakeReply(_Reply):
    """Accepted (``code == ok``) or refused with a reason; ``rho_requested`` as computed by
    the site from the request."""

    STAGE: ClassVar[str] = "handshake"
    rho_requested: float = Field(default=0.0, ge=0)
    # -- site identity (fediim.protocol.identity): the site's signature over the request's
    # nonce, the run id, its site id and its node id; None if the site holds no site key.
    site_signature: bytes | None = None
    # -- secure aggregation: the site's signed key advertisement for every registered site
    # (fediim.protocol.secure_sum.KeyAdvertisement bytes), if the request asked for keys.
    secagg: bytes | None = None


class ReleaseReply(_Reply):
    """The site's cells (``ModelBank.to_bytes``) and its ledger after the charge."""

    STAGE: ClassVar[str] = "release"
    bank: bytes | None = None
    n_cells: int = Field(default=0, ge=0)


class SecureReply(_Reply):
    """The site's protocol message for the step (``secagg``): its signed keys, its
    encrypted shares, its masked input (charged to its ledger first, reported in
    ``ledger``) or its unmasking shares; with its encrypted shares, the first session's
    masked input when the request asked for it (``first_input``, charged likewise)."""

    STAGE: ClassVar[str] = "secure"
    secagg: bytes | None = None
    first_input: bytes | None = None


class ImputeReply(_Reply):
    """A status only (code and ledger summary): no count or value computed from the site's
    records, which would leave the site uncharged, as often as a coordinator asks. The
    site keeps its counts in its own outputs and log."""

    STAGE: ClassVar[str] = "impute"


_REQUESTS: dict[str, type[_Message]] = {
    "handshake": HandshakeRequest, "release": ReleaseRequest, "secure": SecureRequest,
    "impute": ImputeRequest,
}
_REPLIES: dict[str, type[_Reply]] = {
    "handshake": HandshakeReply, "release": ReleaseReply, "secure": SecureReply,
    "impute": ImputeReply,
}


def request_stage(record: RecordDict) -> str:
    """The ``stage`` field of a request record (MessageError if absent or unknown)."""
    stage = _config_of(record).get("stage")
    if not isinstance(stage, str) or stage not in _REQUESTS:
        raise MessageError(f"unknown stage {stage!r}; expected one of {list(STAGES)}")
    return str(stage)


def parse_request(record: RecordDict
                  ) -> HandshakeRequest | ReleaseRequest | SecureRequest | ImputeRequest:
    """The request in ``record``, dispatched on its ``stage`` field."""
    return _REQUESTS[request_stage(record)].from_record(record)  # type: ignore[return-value]


def reply_type(stage: str) -> type[_Reply]:
    """The reply model of ``stage``."""
    if not isinstance(stage, str) or stage not in _REPLIES:
        raise MessageError(f"unknown stage {stage!r}; expected one of {list(STAGES)}")
    return _REPLIES[stage]
