"""Property-based fuzzing of every message decoder: any record gives a message or a clean
:class:`MessageError`, never another exception (a site and the coordinator parse what the
other side sends before anything else)."""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fediim.errors import MessageError
from fediim.protocol.messages import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    LEDGER_RECORD,
    PROTOCOL,
    STAGES,
    HandshakeRequest,
    ImputeReply,
    parse_request,
    reply_type,
)

FIELDS = ["stage", "protocol", "schema_hash", "coordinator_key_id", "epsilon", "delta",
          "min_records", "count_fraction", "max_depth", "cell_noise_ratio", "seed",
          "seed_index", "mode", "k", "site_id", "code", "reason", "rho_requested",
          "n_cells", "outputs", "bank", "signature", "x"]

scalars = st.one_of(
    st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=80), st.booleans(), st.sampled_from(list(STAGES) + [PROTOCOL, "ok"]),
    st.just("a" * 64),
)
config_values = st.one_of(scalars, st.lists(st.integers(-5, 5), max_size=4),
                          st.lists(st.text(max_size=8), max_size=4))
arrays = st.one_of(
    st.binary(max_size=64).map(lambda b: np.frombuffer(b, dtype=np.uint8).copy()),
    st.lists(st.floats(allow_nan=True), max_size=8).map(np.array),
    st.just(np.zeros((2, 3))),
)


@st.composite
def records(draw: st.DrawFn) -> RecordDict:
    config = draw(st.dictionaries(st.sampled_from(FIELDS), config_values, max_size=12))
    if draw(st.booleans()):
        config["protocol"] = PROTOCOL
    if draw(st.booleans()):
        config["stage"] = draw(st.sampled_from(STAGES))
    rd = RecordDict({CONFIG_RECORD: ConfigRecord(config)})
    if draw(st.booleans()):
        named = draw(st.dictionaries(st.sampled_from(FIELDS), arrays, max_size=3))
        rd[ARRAYS_RECORD] = ArrayRecord({k: Array(v) for k, v in named.items()})
    if draw(st.booleans()):
        metrics = draw(st.dictionaries(st.text(max_size=15), st.floats(allow_nan=True),
                                       max_size=8))
        rd[LEDGER_RECORD] = MetricRecord(metrics)
    return rd


def _decode_everything(record: RecordDict) -> list[Any]:
    decoded: list[Any] = []
    for decode in [parse_request, *(reply_type(s).from_record for s in STAGES)]:
        try:
            decoded.append(decode(record))
        except MessageError:
            decoded.append(None)
    return decoded


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(records())
def test_any_record_decodes_or_is_a_message_error(record: RecordDict) -> None:
    _decode_everything(record)


@FUZZ
@given(st.sampled_from(FIELDS), config_values)
def test_a_valid_request_with_one_field_changed_decodes_or_is_a_message_error(
        field: str, value: Any) -> None:
    request = HandshakeRequest(schema_hash="0" * 64, coordinator_key_id="k", epsilon=1.0,
                               delta=1e-6)
    record = request.to_record()
    config = dict(record.config_records[CONFIG_RECORD])
    config[field] = value
    record[CONFIG_RECORD] = ConfigRecord(config)
    decoded = _decode_everything(record)
    if decoded[0] is not None:  # what parses must round-trip
        assert type(decoded[0]).from_record(decoded[0].to_record()) == decoded[0]


def test_a_valid_reply_round_trips() -> None:
    reply = ImputeReply(site_id="a")
    assert ImputeReply.from_record(reply.to_record()) == reply
