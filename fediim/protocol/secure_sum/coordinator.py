"""The coordinator's side of the secure sum: routing, the survivor sets, the unmasking.

The coordinator is honest but curious: it relays advertisements and encrypted shares it
cannot read, names each session's participants, survivors (U3: who sent a masked input)
and dropped sites, and from t or more survivors' shares reconstructs each survivor's
self-mask seed and each dropped site's mask key for that session. Removing those masks
from the sum of the masked inputs leaves exactly the sum of the survivors' inputs; a
dropped site takes no part in any later session. It never returns a partial sum: fewer
than t survivors or t replies is a :class:`SecureAggregationError`.

The first session's masked inputs may be asked with key sharing, over every site that
advertised (U1): they are summed only if every one of them shared its keys (U2 = U1),
which saves a round; else the first session is asked again over U2.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fediim.protocol.secure_sum.masking import SELF_DOMAIN, from_group, pair_mask_sum, prg
from fediim.protocol.secure_sum.messages import (
    AdvertisementBroadcast,
    KeyAdvertisement,
    MaskedInput,
    MaskedInputRequest,
    ShareBundle,
    ShareDelivery,
    UnmaskReply,
    UnmaskRequest,
)
from fediim.protocol.secure_sum.params import SecureAggregationError, SecureSumConfig
from fediim.protocol.secure_sum.shamir import recover_secret, share_from_bytes

__all__ = ["CoordinatorSecureAggregator"]


def _by_site(messages: Iterable[object], attribute: str, allowed: Iterable[str],
             what: str) -> dict:
    """Messages by their sender's id; a duplicate or unexpected sender is an error."""
    allowed_set, found = set(allowed), {}
    for message in messages:
        site = getattr(message, attribute)
        if site not in allowed_set or site in found:
            raise SecureAggregationError(f"{what} from {site!r}: not expected, or twice")
        found[site] = message
    return dict(sorted(found.items()))


class CoordinatorSecureAggregator:
    """The coordinator's secure-sum state for one run (see module docstring)."""

    def __init__(self, config: SecureSumConfig) -> None:
        self.config = config
        self._adverts: dict[str, KeyAdvertisement] = {}
        self._active: tuple[str, ...] = ()  # who takes part in the next session
        self._session = 0
        self._length = 0  # the current session's vector length
        self._masked: dict[str, np.ndarray] = {}
        self._request: UnmaskRequest | None = None
        #: Each finished session's survivors, whose inputs its sum holds.
        self.survivors: list[tuple[str, ...]] = []

    def _quorum(self, sites: Iterable[str], what: str) -> tuple[str, ...]:
        sites = tuple(sorted(sites))
        if len(sites) < self.config.threshold:
            raise SecureAggregationError(f"only {len(sites)} {what}, fewer than the "
                                         f"threshold t = {self.config.threshold}: no sum")
        return sites

    def broadcast_advertisements(self, adverts: Iterable[KeyAdvertisement]
                                 ) -> AdvertisementBroadcast:
        """Round 1: relay the advertisements received (U1) to every site."""
        self._adverts = _by_site(adverts, "site_id", self.config.sites, "an advertisement")
        self._quorum(self._adverts, "sites advertised keys")
        return AdvertisementBroadcast(run_id=self.config.run_id,
                                      advertisements=tuple(self._adverts.values()))

    def route_shares(self, bundles: Iterable[ShareBundle]) -> dict[str, ShareDelivery]:
        """Round 2: each sender's ciphertexts, routed to their recipients; the senders are
        U2, the first session's participants."""
        received = _by_site(bundles, "sender", self._adverts, "a share bundle")
        self._active = self._quorum(received, "sites shared their keys")
        deliveries = {}
        for recipient in self._active:
            ciphertexts = {}
            for sender, bundle in received.items():
                if sender != recipient:
                    if recipient not in bundle.ciphertexts:
                        raise SecureAggregationError(f"site {sender!r} sent no shares for "
                                                     f"{recipient!r}")
                    ciphertexts[sender] = bundle.ciphertexts[recipient]
            deliveries[recipient] = ShareDelivery(run_id=self.config.run_id,
                                                  recipient=recipient, ciphertexts=ciphertexts)
        return deliveries

    def first_input_request(self, length: int | None = None) -> MaskedInputRequest:
        """Round 2's companion: the first session's request over every site that advertised
        (U1), sent with the broadcast; its inputs count only if U2 = U1
        (:meth:`first_inputs_usable`)."""
        if not self._adverts or self._active or self._session:
            raise SecureAggregationError("the first session rides with key sharing only")
        self._length = self.config.session_length(0, length)
        return MaskedInputRequest(run_id=self.config.run_id, session=0,
                                  participants=tuple(self._adverts), length=self._length)

    def first_inputs_usable(self) -> bool:
        """Whether the first session's early inputs can be summed: every site that
        advertised keys also shared them, and no session has started."""
        return (self._session == 0 and self._request is None
                and self._active == tuple(self._adverts))

    def masked_input_request(self, length: int | None = None) -> MaskedInputRequest:
        """Round 3: the next session's request to its participants, with its vector
        ``length`` (needed unless the configuration declares it)."""
        if not self._active or self._session >= self.config.n_sessions or self._request:
            raise SecureAggregationError("no session to start: keys not shared, the last "
                                         "session not unmasked, or every session done")
        self._length = self.config.session_length(self._session, length)
        return MaskedInputRequest(run_id=self.config.run_id, session=self._session,
                                  participants=self._active, length=self._length)

    def unmask_request(self, masked_inputs: Iterable[MaskedInput]) -> UnmaskRequest:
        """Round 4: name the survivors (who sent a masked input) and the dropped sites."""
        received = _by_site(masked_inputs, "site_id", self._active, "a masked input")
        length = self._length
        for site, message in received.items():
            if (message.run_id, message.session, message.length) != (
                    self.config.run_id, self._session, length):
                raise SecureAggregationError(f"site {site!r}'s masked input is for another "
                                             "run or session, or of the wrong length")
        survivors = self._quorum(received, f"survivors in session {self._session}")
        self._masked = {site: message.vector for site, message in received.items()}
        self._request = UnmaskRequest(
            run_id=self.config.run_id, session=self._session, survivors=survivors,
            dropped=tuple(s for s in self._active if s not in received))
        return self._request

    def unmasked_sum(self, replies: Iterable[UnmaskReply]) -> np.ndarray:
        """Round 4: the exact int64 sum of the survivors' inputs, from t or more replies."""
        request = self._request
        if request is None:
            raise SecureAggregationError("no unmask request is pending")
        received = _by_site(replies, "site_id", request.survivors, "an unmask reply")
        self._quorum(received, f"unmask replies in session {request.session}")
        total = np.zeros(self._length, dtype=np.uint64)
        for site in request.survivors:
            total += self._masked[site]
            seed = recover_secret(self._shares(received, site, "self_mask_shares"),
                                  self.config.threshold)
            total -= prg(seed, request.session, total.size, SELF_DOMAIN)
        for site in request.dropped:
            total += self._dropped_masks(site, received, request)
        result = from_group(total)
        self._check_range(result, len(request.survivors))
        self.survivors.append(request.survivors)
        self._active, self._masked, self._request = request.survivors, {}, None
        self._session += 1
        return result

    def _shares(self, replies: dict[str, UnmaskReply], owner: str, field: str
                ) -> dict[int, int]:
        """Every reply's share of ``owner``'s secret named by ``field``, by x-coordinate."""
        shares = {}
        for site, reply in replies.items():
            held = getattr(reply, field)
            if owner not in held or reply.session != self._session:
                raise SecureAggregationError(f"site {site!r}'s unmask reply lacks its share "
                                             f"for {owner!r} in session {self._session}")
            shares[self.config.share_x(site)] = share_from_bytes(held[owner])
        return shares

    def _dropped_masks(self, dropped: str, replies: dict[str, UnmaskReply],
                       request: UnmaskRequest) -> np.ndarray:
        """The pairwise masks the survivors added with ``dropped``, negated (mod 2^64)."""
        key = X25519PrivateKey.from_private_bytes(recover_secret(
            self._shares(replies, dropped, "key_shares"), self.config.threshold))
        publics = {site: self._adverts[site].s_publics[request.session]
                   for site in request.survivors}
        return pair_mask_sum(dropped, key, publics, run_id=self.config.run_id,
                             session=request.session,
                             length=self._length)

    def _check_range(self, result: np.ndarray, n_survivors: int) -> None:
        """Refuse a sum outside the bounds every in-bound input keeps (a wrong share)."""
        bound = n_survivors * self.config.max_abs_per_site
        if result.size and (int(result.max()) > bound or int(result.min()) < -bound):
            raise SecureAggregationError("the unmasked sum is out of the inputs' bounds: a "
                                         "masked input or share was wrong; no sum")
