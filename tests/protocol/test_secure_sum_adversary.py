"""What an honest site refuses: substituted keys, requests that would unmask an input,
tampered or redirected shares, and malformed messages."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from fediim.errors import MessageError
from fediim.protocol.secure_sum import (
    AdvertisementBroadcast,
    KeyAdvertisement,
    MaskedInput,
    MaskedInputRequest,
    SecureAggregationError,
    SecureSumMessage,
    ShareBundle,
    ShareDelivery,
    UnmaskReply,
    UnmaskRequest,
    secure_sums,
)
from fediim.protocol.secure_sum.messages import MAGIC
from tests.protocol.secure_sum_parties import config, parties, shared

ATTACKER_KEY = X25519PrivateKey.generate().public_key().public_bytes_raw()


def _swap(broadcast: AdvertisementBroadcast, site: str, **fields: object
          ) -> AdvertisementBroadcast:
    adverts = tuple(a.model_copy(update=fields) if a.site_id == site else a
                    for a in broadcast.advertisements)
    return AdvertisementBroadcast(run_id=broadcast.run_id, advertisements=adverts)


@pytest.mark.parametrize("victim", ["site-0", "site-2"], ids=["ecdsa", "ed25519"])
@pytest.mark.parametrize("field", ["c_public", "s_publics", "signature"])
def test_a_substituted_or_unsigned_key_is_detected_by_every_honest_site(
        victim: str, field: str) -> None:
    run = parties(config(4, 3, (3, 3)))
    victim_advert = next(a for a in run.broadcast.advertisements if a.site_id == victim)
    value = {"c_public": ATTACKER_KEY, "signature": b"",
             "s_publics": (ATTACKER_KEY,) + victim_advert.s_publics[1:]}[field]
    forged = _swap(run.broadcast, victim, **{field: value})
    for site in run.sites.values():  # the victim too: it checks its own advertisement
        with pytest.raises(SecureAggregationError, match="not signed by its registered"):
            site.share_keys(forged)
    assert run.sites["site-1"].share_keys(run.broadcast).sender == "site-1"


def test_a_broadcast_without_a_sites_own_keys_is_refused_by_it() -> None:
    run = parties(config(4, 3, (3,)))
    without = AdvertisementBroadcast(run_id=42, advertisements=tuple(
        a for a in run.broadcast.advertisements if a.site_id != "site-0"))
    with pytest.raises(SecureAggregationError, match="left out site 'site-0'"):
        run.sites["site-0"].share_keys(without)
    run.sites["site-1"].share_keys(without)  # the others proceed without site-0


def test_an_advertisement_from_another_run_is_refused() -> None:
    run, other = parties(config(3, 2, (2,))), parties(config(3, 2, (2,), run_id=43))
    replayed = AdvertisementBroadcast(run_id=42, advertisements=tuple(
        a if a.site_id != "site-1" else next(o for o in other.broadcast.advertisements
                                             if o.site_id == "site-1")
        for a in run.broadcast.advertisements))
    with pytest.raises(SecureAggregationError, match="another run"):
        run.sites["site-0"].share_keys(replayed)


def test_a_site_refuses_to_reveal_both_secrets_of_one_site_in_one_session() -> None:
    run = shared(config(4, 2, (3,)))
    request = run.coordinator.masked_input_request()
    for site in run.sites.values():
        site.masked_input(request, np.ones(3, dtype=np.int64))
    both = UnmaskRequest(run_id=42, session=0, survivors=("site-0", "site-1", "site-2"),
                         dropped=("site-1", "site-3"))
    with pytest.raises(SecureAggregationError, match="both survivor and dropped"):
        run.sites["site-0"].unmask(both)
    honest = UnmaskRequest(run_id=42, session=0, survivors=("site-0", "site-1", "site-2"),
                           dropped=("site-3",))
    reply = run.sites["site-0"].unmask(honest)
    assert set(reply.self_mask_shares) == {"site-0", "site-1", "site-2"}
    assert set(reply.key_shares) == {"site-3"}
    with pytest.raises(SecureAggregationError, match="already unmasked"):
        run.sites["site-0"].unmask(honest.model_copy(update={
            "survivors": ("site-0", "site-2"), "dropped": ("site-1", "site-3")}))


def test_a_site_named_dropped_takes_no_part_in_later_sessions() -> None:
    """site-3 dropped in session 0 (its session-0 key revealed); a session-1 request naming
    it again, or asked before session 0 was unmasked, is refused."""
    run = shared(config(4, 2, (2, 2)))
    request = run.coordinator.masked_input_request()
    masked = [run.sites[s].masked_input(request, np.zeros(2, np.int64))
              for s in ("site-0", "site-1", "site-2")]
    early = MaskedInputRequest(run_id=42, session=1, participants=request.participants,
                               length=2)
    with pytest.raises(SecureAggregationError, match="before this site's last session"):
        run.sites["site-0"].masked_input(early, np.zeros(2, np.int64))
    unmask = run.coordinator.unmask_request(masked)
    assert unmask.dropped == ("site-3",)
    run.coordinator.unmasked_sum([run.sites[s].unmask(unmask) for s in unmask.survivors])
    assert run.coordinator.masked_input_request().participants == unmask.survivors
    with pytest.raises(SecureAggregationError, match=r"\['site-3'\] as participants"):
        run.sites["site-0"].masked_input(early, np.zeros(2, np.int64))


def test_a_site_refuses_an_unmask_with_fewer_than_t_survivors() -> None:
    run = shared(config(4, 3, (2,)))
    request = run.coordinator.masked_input_request()
    run.sites["site-0"].masked_input(request, np.zeros(2, np.int64))
    few = UnmaskRequest(run_id=42, session=0, survivors=("site-0", "site-1"),
                        dropped=("site-2", "site-3"))
    with pytest.raises(SecureAggregationError, match="fewer than the threshold"):
        run.sites["site-0"].unmask(few)


def _deliveries(n_sites: int = 3) -> tuple[object, dict[str, ShareDelivery]]:
    run = parties(config(n_sites, 2, (2,)))
    bundles = [site.share_keys(run.broadcast) for site in run.sites.values()]
    return run, run.coordinator.route_shares(bundles)


def test_a_tampered_or_redirected_share_ciphertext_is_refused() -> None:
    run, deliveries = _deliveries(4)
    delivery = deliveries["site-0"]
    ciphertext = bytearray(delivery.ciphertexts["site-1"])
    ciphertext[-1] ^= 1
    tampered = delivery.model_copy(update={"ciphertexts": {
        **delivery.ciphertexts, "site-1": bytes(ciphertext)}})
    with pytest.raises(SecureAggregationError, match="do not decrypt"):
        run.sites["site-0"].receive_shares(tampered)
    redirected = delivery.model_copy(update={"ciphertexts": {
        **delivery.ciphertexts, "site-1": deliveries["site-2"].ciphertexts["site-1"]}})
    with pytest.raises(SecureAggregationError, match="do not decrypt"):
        run.sites["site-0"].receive_shares(redirected)
    run.sites["site-0"].receive_shares(delivery)  # the untouched delivery is accepted


def test_every_message_round_trips_through_its_bytes() -> None:
    seen: list[tuple[str, bytes]] = []
    cfg = config(3, 2, (4, 2))
    secure_sums(cfg, {s: [np.arange(4), np.arange(2)] for s in cfg.sites},
                observe=lambda kind, data: seen.append((kind, data)))
    run, deliveries = _deliveries()
    sent = [run.broadcast, *deliveries.values(),
            MaskedInputRequest(run_id=1, session=0, participants=("a", "b"), length=3)]
    kinds = {cls.kind: cls for cls in (KeyAdvertisement, ShareBundle, MaskedInput,
                                       UnmaskReply, UnmaskRequest, AdvertisementBroadcast,
                                       ShareDelivery, MaskedInputRequest)}
    assert {kind for kind, _ in seen} == {"advertise_keys", "share_keys", "masked_input",
                                          "unmask_reply"}
    for message in [kinds[kind].decode(data) for kind, data in seen] + sent:
        data = message.encode()
        assert type(message).decode(data) == message
        assert type(message).decode(data).encode() == data


def test_malformed_messages_are_clear_errors() -> None:
    good = MaskedInput(run_id=1, session=0, site_id="a", length=2, masked=bytes(16)).encode()
    bad = {"truncated payload": good[:-1], "extra payload": good + b"\0" * 8,
           "truncated header": good[:len(MAGIC) + 6], "bad magic": b"x" + good[1:],
           "empty": b"", "header length": good[:len(MAGIC)] + b"\xff\xff\xff\x00" +
           good[len(MAGIC) + 4:]}
    for name, data in bad.items():
        with pytest.raises(MessageError):
            MaskedInput.decode(data)
        assert name
    with pytest.raises(MessageError, match="not a 'unmask_request'"):
        UnmaskRequest.decode(good)
    with pytest.raises(MessageError, match="c_public"):
        KeyAdvertisement.decode(KeyAdvertisement.model_construct(
            run_id=1, site_id="a", c_public=b"short", s_publics=(), n_sessions=1,
            threshold=2, signature=b"").encode())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([
    KeyAdvertisement, AdvertisementBroadcast, ShareBundle, ShareDelivery, MaskedInputRequest,
    MaskedInput, UnmaskRequest, UnmaskReply]))
def test_any_bytes_decode_to_a_message_or_a_message_error(
        data: bytes, cls: type[SecureSumMessage]) -> None:
    for candidate in (data, MAGIC + data, MAGIC + len(data).to_bytes(4, "little") + data):
        try:
            cls.decode(candidate)
        except MessageError:
            pass
