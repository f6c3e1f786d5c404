"""Signed key advertisements: what a site signs, and every site's check of every other's.

A site signs, with its registered identity key (Ed25519 or ECDSA, through
:func:`fediim.protocol.identity.sign_payload`), the canonical JSON document::

    {"c_public": "<hex>", "format": "fediim-secagg-keys/1", "n_sessions": 3,
     "run_id": 123, "s_publics": ["<hex>", ...], "site_id": "hospital-a", "threshold": 3}

so the coordinator, which only relays advertisements, cannot substitute a key, replay one
from another run, or change the run's shape unnoticed: every site verifies every
advertisement against the public key registered for its site id.
"""

from __future__ import annotations

from collections.abc import Mapping

from fediim.protocol.identity import SitePublicKey, payload_signature_verifies
from fediim.protocol.secure_sum.keys import canonical_json
from fediim.protocol.secure_sum.messages import AdvertisementBroadcast, KeyAdvertisement
from fediim.protocol.secure_sum.params import SecureAggregationError, SecureSumConfig

__all__ = ["ADVERTISEMENT_FORMAT", "advertisement_payload", "verify_advertisements"]

ADVERTISEMENT_FORMAT = "fediim-secagg-keys/1"


def advertisement_payload(*, run_id: int, site_id: str, c_public: bytes,
                          s_publics: tuple[bytes, ...], n_sessions: int,
                          threshold: int) -> bytes:
    """The canonical bytes a site signs to advertise its keys (see module docstring)."""
    return canonical_json({"format": ADVERTISEMENT_FORMAT, "run_id": run_id,
                           "site_id": site_id, "c_public": c_public.hex(),
                           "s_publics": [key.hex() for key in s_publics],
                           "n_sessions": n_sessions, "threshold": threshold})


def _verify_one(advert: KeyAdvertisement, config: SecureSumConfig,
                registry: Mapping[str, SitePublicKey]) -> None:
    """Raise unless ``advert`` is a well-formed advertisement of this run, signed by the
    identity key registered for its site."""
    site = advert.site_id
    if site not in config.sites or site not in registry:
        raise SecureAggregationError(f"an advertisement from {site!r}, which is not a "
                                     "registered site of this run")
    if (advert.run_id, advert.n_sessions, advert.threshold, len(advert.s_publics)) != (
            config.run_id, config.n_sessions, config.threshold, config.n_sessions):
        raise SecureAggregationError(f"site {site!r}'s advertisement is for another run, "
                                     "number of sessions or threshold")
    payload = advertisement_payload(
        run_id=advert.run_id, site_id=site, c_public=advert.c_public,
        s_publics=advert.s_publics, n_sessions=advert.n_sessions, threshold=advert.threshold)
    if not payload_signature_verifies(registry[site], advert.signature, payload):
        raise SecureAggregationError(
            f"site {site!r}'s advertised keys are not signed by its registered identity key: "
            "a substituted or unsigned key; refused")


def verify_advertisements(broadcast: AdvertisementBroadcast, config: SecureSumConfig,
                          registry: Mapping[str, SitePublicKey]) -> dict[str, KeyAdvertisement]:
    """The broadcast's advertisements by site id (U1), every one verified; at least t."""
    if broadcast.run_id != config.run_id:
        raise SecureAggregationError("an advertisement broadcast for another run")
    adverts: dict[str, KeyAdvertisement] = {}
    for advert in broadcast.advertisements:
        if advert.site_id in adverts:
            raise SecureAggregationError(f"site {advert.site_id!r} is advertised twice")
        _verify_one(advert, config, registry)
        adverts[advert.site_id] = advert
    if len(adverts) < config.threshold:
        raise SecureAggregationError(f"only {len(adverts)} sites advertised keys, fewer than "
                                     f"the threshold t = {config.threshold}; refused")
    return dict(sorted(adverts.items()))
