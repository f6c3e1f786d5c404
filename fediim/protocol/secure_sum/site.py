"""A site's side of the secure sum: its secrets between the phases, and every check.

A site answers four kinds of request, in order: advertise keys, share keys (given the
broadcast advertisements), masked input (once per session, given the session's
participants and the site's input) and unmask (once per session). The first session's
input may ride with key sharing, masked with every site that advertised keys (U1), since
who shares (U2) is not known yet: the coordinator sums it only if U2 = U1, else it asks
the first session again over U2 and the site masks the same input again. A site refuses
with :class:`SecureAggregationError`, before revealing anything, whenever a request could
break the protocol's guarantees:

- an advertisement that is unsigned, signed by a key other than the one registered for
  its site, for another run or run shape, or that replaces this site's own keys;
- participants of a session that include a site which did not share its keys (U2), a site
  named dropped in an earlier session, or fewer than t sites; a session asked before this
  site answered the unmask of its previous one (so it always knows who was dropped); any
  session but the first, once and over exactly U1, before the shares are delivered;
- an input of the wrong length or type, or with an entry beyond the per-site bound;
- an unmask request for a session this site did not mask an input in, asked twice, before
  the shares are delivered, with fewer than t survivors, naming a site that did not share
  its keys, or naming one site both survivor and dropped (which would reveal both its
  self-mask seed and its mask key for that session, hence its input).

Each site has one mask key pair per session, so revealing a dropped site's key for session
k (to remove its pairwise masks) says nothing about its masks in any other session, where
its self-mask seed may have been revealed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fediim.protocol.identity import SitePrivateKey, SitePublicKey, sign_payload
from fediim.protocol.secure_sum.advertising import advertisement_payload, verify_advertisements
from fediim.protocol.secure_sum.keys import (
    KEY_BYTES,
    canonical_json,
    decrypt_for,
    encrypt_for,
    public_bytes,
)
from fediim.protocol.secure_sum.masking import SELF_DOMAIN, pair_mask_sum, prg, to_group
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
from fediim.protocol.secure_sum.shamir import (
    SHARE_BYTES,
    share_from_bytes,
    share_to_bytes,
    split_secret,
)

__all__ = ["STATE_FORMAT", "SiteSecureAggregator"]

#: Tag of a site's serialised state (:meth:`SiteSecureAggregator.to_bytes`).
STATE_FORMAT = "fediim-secagg-site-state/1"


class SiteSecureAggregator:
    """One site's secure-sum state for one run (see module docstring).

    Parameters
    ----------
    config : the run's public parameters.
    site_id : this site's id (one of ``config.sites``).
    identity_key : this site's identity key (its registered site key).
    registry : every site's registered public identity key, site id -> key.
    """

    def __init__(self, config: SecureSumConfig, site_id: str, identity_key: SitePrivateKey,
                 registry: Mapping[str, SitePublicKey]) -> None:
        if site_id not in config.sites:
            raise SecureAggregationError(f"site {site_id!r} is not a site of this run")
        missing = [s for s in config.sites if s not in registry]
        if missing:
            raise SecureAggregationError(f"no registered identity key for sites {missing}")
        self.config, self.site_id = config, site_id
        self._identity, self._registry = identity_key, dict(registry)
        self._c_key = X25519PrivateKey.generate()
        self._s_keys = [X25519PrivateKey.generate() for _ in range(config.n_sessions)]
        self._self_seeds = [os.urandom(KEY_BYTES) for _ in range(config.n_sessions)]
        self._peers: dict[str, KeyAdvertisement] = {}  # U1: verified advertisements
        self._shares: dict[str, list[tuple[int, int]]] = {}  # owner -> (s, b) per session
        self._allowed: tuple[str, ...] = ()  # who may be a participant of the next session
        self._participants: dict[int, tuple[str, ...]] = {}
        self._answered: set[int] = set()
        self._first_early = False  # session 0 was masked with key sharing, over U1

    def to_bytes(self) -> bytes:
        """This site's whole state, secrets included, for an app that answers each message
        in a new process (a Flower ClientApp keeps it in the run's in-memory
        ``context.state``). Keep it in memory: it must never be written to disk or logs."""
        cfg = self.config
        doc = {"format": STATE_FORMAT, "site_id": self.site_id,
               "config": {"run_id": cfg.run_id, "sites": list(cfg.sites),
                          "threshold": cfg.threshold,
                          "vector_lengths": list(cfg.vector_lengths),
                          "max_abs_per_site": cfg.max_abs_per_site},
               "c_key": self._c_key.private_bytes_raw().hex(),
               "s_keys": [key.private_bytes_raw().hex() for key in self._s_keys],
               "self_seeds": [seed.hex() for seed in self._self_seeds],
               "peers": {site: advert.encode().hex() for site, advert in self._peers.items()},
               "shares": {owner: [[share_to_bytes(s).hex(), share_to_bytes(b).hex()]
                                  for s, b in pairs] for owner, pairs in self._shares.items()},
               "allowed": list(self._allowed),
               "participants": {str(k): list(v) for k, v in self._participants.items()},
               "answered": sorted(self._answered), "first_early": self._first_early}
        return canonical_json(doc)

    @classmethod
    def from_bytes(cls, data: bytes, identity_key: SitePrivateKey,
                   registry: Mapping[str, SitePublicKey],
                   sites: tuple[str, ...] | None = None) -> SiteSecureAggregator:
        """The site state :meth:`to_bytes` wrote (the identity key and registry are the
        site's own, loaded again); :class:`SecureAggregationError` if it is not one.

        ``sites``: the run's sites, when the keys were advertised before they were known
        (e.g. with the handshake, for every registered site): a subset of the state's
        sites that includes this one, accepted only before keys are shared (the Shamir
        x-coordinates follow from it)."""
        try:
            doc = json.loads(bytes(data).decode("utf-8"))
            if doc.get("format") != STATE_FORMAT:
                raise ValueError(f"not a {STATE_FORMAT} document")
            raw = doc["config"]
            if sites is not None and tuple(sites) != tuple(raw["sites"]):
                if doc["peers"] or not set(sites) <= set(raw["sites"]) or (
                        doc["site_id"] not in sites):
                    raise SecureAggregationError(
                        "the run's sites may only narrow the advertised ones, to a set "
                        "holding this site, before keys are shared")
                raw = {**raw, "sites": list(sites)}
            config = SecureSumConfig(run_id=raw["run_id"], sites=tuple(raw["sites"]),
                                     threshold=raw["threshold"],
                                     vector_lengths=tuple(raw["vector_lengths"]),
                                     max_abs_per_site=raw["max_abs_per_site"])
            site = cls.__new__(cls)
            site._restore(doc, config, identity_key, registry)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SecureAggregationError(f"an unreadable secure-sum site state: {exc}") from None
        return site

    def _restore(self, doc: dict[str, Any], config: SecureSumConfig,
                 identity_key: SitePrivateKey, registry: Mapping[str, SitePublicKey]) -> None:
        """Set every attribute from a :meth:`to_bytes` document."""
        key = X25519PrivateKey.from_private_bytes
        self.config, self.site_id = config, doc["site_id"]
        self._identity, self._registry = identity_key, dict(registry)
        self._c_key = key(bytes.fromhex(doc["c_key"]))
        self._s_keys = [key(bytes.fromhex(k)) for k in doc["s_keys"]]
        self._self_seeds = [bytes.fromhex(seed) for seed in doc["self_seeds"]]
        self._peers = {site: KeyAdvertisement.decode(bytes.fromhex(advert))
                       for site, advert in doc["peers"].items()}
        self._shares = {owner: [(share_from_bytes(bytes.fromhex(s)),
                                 share_from_bytes(bytes.fromhex(b))) for s, b in pairs]
                        for owner, pairs in doc["shares"].items()}
        self._allowed = tuple(doc["allowed"])
        self._participants = {int(k): tuple(v) for k, v in doc["participants"].items()}
        self._answered = set(doc["answered"])
        self._first_early = bool(doc["first_early"])

    def advertise(self) -> KeyAdvertisement:
        """Round 1: this site's public keys, signed with its identity key."""
        fields = {"run_id": self.config.run_id, "site_id": self.site_id,
                  "c_public": public_bytes(self._c_key),
                  "s_publics": tuple(public_bytes(key) for key in self._s_keys),
                  "n_sessions": self.config.n_sessions, "threshold": self.config.threshold}
        signature = sign_payload(self._identity, advertisement_payload(**fields))
        return KeyAdvertisement(**fields, signature=signature)

    def share_keys(self, broadcast: AdvertisementBroadcast) -> ShareBundle:
        """Round 2: verify every advertisement, then Shamir-share this site's mask keys and
        self-mask seeds among the advertised sites, each recipient's shares encrypted."""
        if self._peers:
            raise SecureAggregationError(f"site {self.site_id!r} already shared its keys")
        peers = verify_advertisements(broadcast, self.config, self._registry)
        self._check_own_advertisement(peers)
        self._peers = peers
        split = [(split_secret(self._s_keys[k].private_bytes_raw(), self.config.threshold,
                               self._xs(peers)),
                  split_secret(self._self_seeds[k], self.config.threshold, self._xs(peers)))
                 for k in range(self.config.n_sessions)]
        ciphertexts = {}
        for peer, advert in peers.items():
            x = self.config.share_x(peer)
            own = [(s_shares[x], b_shares[x]) for s_shares, b_shares in split]
            if peer == self.site_id:
                self._shares[peer] = own
                continue
            plaintext = b"".join(share_to_bytes(s) + share_to_bytes(b) for s, b in own)
            ciphertexts[peer] = encrypt_for(plaintext, self._c_key, advert.c_public,
                                            run_id=self.config.run_id, sender=self.site_id,
                                            recipient=peer)
        return ShareBundle(run_id=self.config.run_id, sender=self.site_id,
                           ciphertexts=ciphertexts)

    def _check_own_advertisement(self, peers: Mapping[str, KeyAdvertisement]) -> None:
        """Refuse a broadcast that leaves out or replaces this site's own keys."""
        mine = peers.get(self.site_id)
        if mine is None or mine.c_public != public_bytes(self._c_key) or mine.s_publics != tuple(
                public_bytes(key) for key in self._s_keys):
            raise SecureAggregationError(f"the broadcast replaced or left out site "
                                         f"{self.site_id!r}'s own keys")

    def _xs(self, peers: Mapping[str, KeyAdvertisement]) -> list[int]:
        return [self.config.share_x(peer) for peer in peers]

    def receive_shares(self, delivery: ShareDelivery) -> None:
        """Round 2, delivered: decrypt the shares held for each site of U2 (every sender)."""
        if not self._peers or len(self._shares) > 1:
            raise SecureAggregationError("shares are delivered once, after key sharing")
        if delivery.run_id != self.config.run_id or delivery.recipient != self.site_id:
            raise SecureAggregationError("a share delivery for another run or site")
        unknown = sorted(set(delivery.ciphertexts) - set(self._peers) | (
            {self.site_id} & set(delivery.ciphertexts)))
        if unknown:
            raise SecureAggregationError(f"shares from sites that did not advertise: {unknown}")
        for sender, ciphertext in sorted(delivery.ciphertexts.items()):
            plaintext = decrypt_for(ciphertext, self._c_key, self._peers[sender].c_public,
                                    run_id=self.config.run_id, sender=sender,
                                    recipient=self.site_id)
            self._shares[sender] = self._parse_shares(plaintext, sender)
        self._allowed = tuple(sorted(self._shares))
        self._require_quorum(self._allowed, "sites that shared their keys")

    def _parse_shares(self, plaintext: bytes, sender: str) -> list[tuple[int, int]]:
        width = 2 * SHARE_BYTES
        if len(plaintext) != width * self.config.n_sessions:
            raise SecureAggregationError(f"site {sender!r} sent shares of the wrong size")
        return [(share_from_bytes(plaintext[i:i + SHARE_BYTES]),
                 share_from_bytes(plaintext[i + SHARE_BYTES:i + width]))
                for i in range(0, len(plaintext), width)]

    def _require_quorum(self, sites: tuple[str, ...], what: str) -> None:
        if len(sites) < self.config.threshold:
            raise SecureAggregationError(f"only {len(sites)} {what}, fewer than the "
                                         f"threshold t = {self.config.threshold}; refused")

    def masked_input(self, request: MaskedInputRequest, values: np.ndarray) -> MaskedInput:
        """Round 3: this session's input, masked by the self mask and the pairwise masks
        with every other participant. Asked again for the first session (over U2, after an
        early input over U1), the app must pass the same input: the two masked vectors then
        differ only by masks with sites that never shared their keys."""
        session = self.check_masked_input_request(request)
        vector = self._checked_input(values, session, request.length)
        participants = request.participants
        masked = to_group(vector) + prg(self._self_seeds[session], session, vector.size,
                                        SELF_DOMAIN)
        masked += pair_mask_sum(self.site_id, self._s_keys[session],
                                {peer: self._peers[peer].s_publics[session]
                                 for peer in participants},
                                run_id=self.config.run_id, session=session, length=vector.size)
        self._first_early = session == 0 and not self._allowed
        self._participants[session] = participants
        return MaskedInput(run_id=self.config.run_id, session=session, site_id=self.site_id,
                           length=vector.size, masked=masked.astype("<u8").tobytes())

    def check_masked_input_request(self, request: MaskedInputRequest) -> int:
        """The session of a valid masked-input request (see module docstring); an app
        calls it before it computes (and pays for) its input."""
        session = request.session
        if request.run_id != self.config.run_id or session >= self.config.n_sessions:
            raise SecureAggregationError(f"a masked-input request for another run or for "
                                         f"session {session} of {self.config.n_sessions}")
        self.config.session_length(session, request.length)
        participants = request.participants
        if list(participants) != sorted(set(participants)) or self.site_id not in participants:
            raise SecureAggregationError("the participants must be sorted, distinct and "
                                         "include this site")
        if self._allowed:
            self._check_session_order(session, participants)
        elif not self._peers or session != 0 or self._participants or (
                participants != tuple(sorted(self._peers))):
            raise SecureAggregationError(
                f"session {session} asked before the shares were delivered: only the first "
                "session may be, once, over every site that advertised keys; refused")
        self._require_quorum(participants, f"participants in session {session}")
        return session

    def _check_session_order(self, session: int, participants: tuple[str, ...]) -> None:
        """Refuse a session out of order (the first may come again after an early input
        that was not unmasked), or over a site that did not share or was named dropped."""
        last = max(self._participants, default=-1)
        again = session == 0 and self._first_early and 0 not in self._answered
        if not again and (session <= last or (last >= 0 and last not in self._answered)):
            raise SecureAggregationError(f"session {session} asked out of order, or before "
                                         "this site's last session was unmasked")
        excluded = sorted(set(participants) - set(self._allowed))
        if excluded:
            raise SecureAggregationError(
                f"session {session} names {excluded} as participants: they did not share "
                "their keys or were named dropped in an earlier session; refused")

    def _checked_input(self, values: np.ndarray, session: int, length: int) -> np.ndarray:
        """The site's input as int64, refused if of the wrong shape, type or magnitude."""
        array = np.asarray(values)
        if array.shape != (length,) or not np.issubdtype(array.dtype, np.integer):
            raise SecureAggregationError(f"session {session} takes an integer vector of "
                                         f"length {length}, got {array.dtype} {array.shape}")
        bound = self.config.max_abs_per_site
        if array.size and (int(array.max()) > bound or int(array.min()) < -bound):
            raise SecureAggregationError(f"an input entry exceeds the declared per-site "
                                         f"bound {bound}; refused to mask it")
        return array.astype(np.int64)

    def unmask(self, request: UnmaskRequest) -> UnmaskReply:
        """Round 4: this site's shares of each survivor's self-mask seed and of each dropped
        site's mask key, for this session only."""
        session = self._check_unmask_request(request)
        self._answered.add(session)
        self._allowed = request.survivors
        return UnmaskReply(
            run_id=self.config.run_id, session=session, site_id=self.site_id,
            self_mask_shares={u: share_to_bytes(self._shares[u][session][1])
                              for u in request.survivors},
            key_shares={w: share_to_bytes(self._shares[w][session][0])
                        for w in request.dropped})

    def _check_unmask_request(self, request: UnmaskRequest) -> int:
        """The session of a valid unmask request (see module docstring)."""
        session = request.session
        participants = self._participants.get(session)
        if request.run_id != self.config.run_id or participants is None:
            raise SecureAggregationError(f"an unmask request for another run, or for session "
                                         f"{session} where this site masked no input")
        if session in self._answered:
            raise SecureAggregationError(f"session {session} was already unmasked; refused")
        survivors, dropped = set(request.survivors), set(request.dropped)
        if survivors & dropped:
            raise SecureAggregationError(
                f"sites {sorted(survivors & dropped)} are named both survivor and dropped in "
                f"session {session}: that would reveal both their self-mask seed and their "
                "mask key, hence their input; refused")
        if survivors | dropped != set(participants) or len(survivors) + len(dropped) != len(
                participants) or list(request.survivors) != sorted(survivors):
            raise SecureAggregationError(f"the survivors and dropped sites of session "
                                         f"{session} must split its participants; refused")
        if self.site_id not in survivors:
            raise SecureAggregationError(f"site {self.site_id!r} sent its masked input but is "
                                         "named dropped; refused")
        unshared = sorted((survivors | dropped) - set(self._allowed))
        if not self._allowed or unshared:
            raise SecureAggregationError(f"an unmask of session {session} before the shares "
                                         f"were delivered, or naming sites {unshared} that did "
                                         "not share their keys; refused")
        self._require_quorum(request.survivors, f"survivors in session {session}")
        return session
