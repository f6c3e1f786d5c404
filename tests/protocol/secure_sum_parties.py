"""Helpers for the secure-sum tests: parties stepped by hand, and the coordinator's view."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fediim.protocol.secure_sum import (
    AdvertisementBroadcast,
    CoordinatorSecureAggregator,
    MaskedInput,
    SecureSumConfig,
    SiteSecureAggregator,
    UnmaskReply,
)
from fediim.protocol.secure_sum.masking import SELF_DOMAIN, prg, to_group
from fediim.protocol.secure_sum.shamir import recover_secret, share_from_bytes


def config(n_sites: int = 4, threshold: int = 3, lengths: tuple[int, ...] = (6, 5),
           max_abs: int = 1000, run_id: int = 42) -> SecureSumConfig:
    """A run of ``n_sites`` sites named site-0, site-1, ..."""
    return SecureSumConfig(run_id=run_id, sites=tuple(f"site-{i}" for i in range(n_sites)),
                           threshold=threshold, vector_lengths=lengths,
                           max_abs_per_site=max_abs)


@dataclass
class Parties:
    """Every party of one run, with keys set up through the broadcast (not yet shared)."""

    config: SecureSumConfig
    sites: dict[str, SiteSecureAggregator]
    coordinator: CoordinatorSecureAggregator
    broadcast: AdvertisementBroadcast


def parties(cfg: SecureSumConfig) -> Parties:
    """Sites (the first with an ECDSA P-256 identity, the others Ed25519) after round 1."""
    keys = {site: ec.generate_private_key(ec.SECP256R1()) if i == 0
            else Ed25519PrivateKey.generate() for i, site in enumerate(cfg.sites)}
    registry = {site: key.public_key() for site, key in keys.items()}
    sites = {site: SiteSecureAggregator(cfg, site, keys[site], registry) for site in cfg.sites}
    coordinator = CoordinatorSecureAggregator(cfg)
    broadcast = coordinator.broadcast_advertisements(s.advertise() for s in sites.values())
    return Parties(cfg, sites, coordinator, broadcast)


def shared(cfg: SecureSumConfig) -> Parties:
    """Parties after round 2: every site shared its keys and received its shares."""
    run = parties(cfg)
    bundles = [site.share_keys(run.broadcast) for site in run.sites.values()]
    for site, delivery in run.coordinator.route_shares(bundles).items():
        run.sites[site].receive_shares(delivery)
    return run


def self_unmasked(masked: list[MaskedInput], replies: list[UnmaskReply], cfg: SecureSumConfig
                  ) -> dict[str, np.ndarray]:
    """What the coordinator computes after an unmask: each survivor's masked input minus its
    self mask (its input plus its pairwise masks), from the messages it received."""
    views = {}
    for message in masked:
        shares = {cfg.share_x(r.site_id): share_from_bytes(r.self_mask_shares[message.site_id])
                  for r in replies}
        seed = recover_secret(shares, cfg.threshold)
        views[message.site_id] = message.vector - prg(seed, message.session, message.length,
                                                      SELF_DOMAIN)
    return views


def as_group(vector: np.ndarray) -> np.ndarray:
    """An int64 vector's Z_{2^64} bits (to run a statistic on unmasked data)."""
    return to_group(vector)
