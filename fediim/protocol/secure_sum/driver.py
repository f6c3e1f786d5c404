"""The whole secure-sum protocol in one process: for tests and in-process simulation.

:func:`secure_sums` plays the coordinator and every site, passes every message through its
byte encoding (as a deployment carries it), and lets sites drop before any phase. An
``observe`` callback sees every encoded message the coordinator receives (its view).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fediim.protocol.identity import SitePrivateKey, SitePublicKey
from fediim.protocol.secure_sum.coordinator import CoordinatorSecureAggregator
from fediim.protocol.secure_sum.messages import SecureSumMessage
from fediim.protocol.secure_sum.params import SecureAggregationError, SecureSumConfig
from fediim.protocol.secure_sum.site import SiteSecureAggregator

__all__ = ["Dropout", "Phase", "SecureSumResult", "secure_sums"]

M = TypeVar("M", bound=SecureSumMessage)
Observer = Callable[[str, bytes], None]


class Phase(StrEnum):
    """The protocol phase a site may drop before."""

    ADVERTISE = "advertise"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    UNMASK = "unmask"


@dataclass(frozen=True)
class Dropout:
    """A site drops before ``phase`` (of ``session``, for the per-session phases) and
    answers nothing from then on."""

    phase: Phase
    session: int = 0


@dataclass(frozen=True)
class SecureSumResult:
    """Each session's exact int64 sum and the sites whose inputs it holds."""

    sums: tuple[np.ndarray, ...]
    survivors: tuple[tuple[str, ...], ...]


def _wire(message: M, observe: Observer | None = None) -> M:
    """``message`` through its byte encoding, shown to ``observe`` if given."""
    data = message.encode()
    if observe is not None:
        observe(message.kind, data)
    return type(message).decode(data)


class _Run:
    """One in-process protocol run: which sites are still answering, and the phases."""

    def __init__(self, config: SecureSumConfig, sites: dict[str, SiteSecureAggregator],
                 dropouts: Mapping[str, Dropout], observe: Observer | None) -> None:
        self.config, self.sites, self.observe = config, sites, observe
        self.dropouts = dict(dropouts)
        self.coordinator = CoordinatorSecureAggregator(config)
        self.gone: set[str] = set()

    def answering(self, phase: Phase, session: int = 0) -> list[str]:
        """The sites still answering at ``phase`` (marking those that drop now)."""
        for site, drop in self.dropouts.items():
            per_session = drop.phase in (Phase.MASKED_INPUT, Phase.UNMASK)
            if drop.phase == phase and (not per_session or drop.session == session):
                self.gone.add(site)
        return [site for site in self.sites if site not in self.gone]

    def set_up(self) -> None:
        """Rounds 1 and 2: advertise keys, share keys, deliver the shares."""
        adverts = [_wire(self.sites[s].advertise(), self.observe)
                   for s in self.answering(Phase.ADVERTISE)]
        broadcast = _wire(self.coordinator.broadcast_advertisements(adverts))
        bundles = [_wire(self.sites[s].share_keys(broadcast), self.observe)
                   for s in self.answering(Phase.SHARE_KEYS) if s in
                   {a.site_id for a in adverts}]
        for site, delivery in self.coordinator.route_shares(bundles).items():
            self.sites[site].receive_shares(_wire(delivery))

    def session(self, session: int, inputs: Mapping[str, Sequence[np.ndarray]]) -> np.ndarray:
        """Rounds 3 and 4 of one session: masked inputs, then unmasking."""
        announced = len(inputs[self.config.sites[0]][session])
        request = _wire(self.coordinator.masked_input_request(
            None if self.config.vector_lengths[session] else announced))
        masked = [_wire(self.sites[s].masked_input(request, inputs[s][session]), self.observe)
                  for s in self.answering(Phase.MASKED_INPUT, session)
                  if s in request.participants]
        unmask = _wire(self.coordinator.unmask_request(masked))
        replies = [_wire(self.sites[s].unmask(unmask), self.observe)
                   for s in self.answering(Phase.UNMASK, session) if s in unmask.survivors]
        return self.coordinator.unmasked_sum(replies)


def secure_sums(config: SecureSumConfig, inputs: Mapping[str, Sequence[np.ndarray]], *,
                identity_keys: Mapping[str, SitePrivateKey] | None = None,
                dropouts: Mapping[str, Dropout] | None = None,
                observe: Observer | None = None) -> SecureSumResult:
    """Run the protocol for every session of ``config`` in process.

    ``inputs`` holds each site's int64 vector per session; ``identity_keys`` each site's
    identity key (fresh Ed25519 keys if None; the registry is their public keys);
    ``dropouts`` which site drops before which phase; ``observe(kind, bytes)`` sees every
    message the coordinator receives. Raises :class:`SecureAggregationError` (no partial
    sum) if a quorum fails or any party refuses."""
    missing = [s for s in config.sites if len(inputs.get(s, ())) != config.n_sessions]
    if missing:
        raise SecureAggregationError(f"sites {missing} need one input per session")
    keys = dict(identity_keys) if identity_keys is not None else {
        site: Ed25519PrivateKey.generate() for site in config.sites}
    registry: dict[str, SitePublicKey] = {site: key.public_key() for site, key in keys.items()}
    sites = {site: SiteSecureAggregator(config, site, keys[site], registry)
             for site in config.sites}
    run = _Run(config, sites, dropouts or {}, observe)
    run.set_up()
    sums = tuple(run.session(k, inputs) for k in range(config.n_sessions))
    return SecureSumResult(sums=sums, survivors=tuple(run.coordinator.survivors))

