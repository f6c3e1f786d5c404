"""Secure aggregation (Bonawitz et al., CCS 2017): the coordinator learns only sums.

Sites mask integer vectors in Z_{2^64} with pairwise masks (X25519 + HKDF-SHA256 +
ChaCha20) that cancel in the sum and a self mask that the coordinator removes once it
knows who survived; Shamir shares of the mask secrets, exchanged under ChaCha20-Poly1305,
let the sum be recovered when sites drop. Keys are signed with each site's registered
identity key. Written once as plain functions over messages:

- :class:`SiteSecureAggregator` and :class:`CoordinatorSecureAggregator`, one per party;
- the messages (``encode()`` / ``decode(bytes)``) in :mod:`.messages`;
- :func:`secure_sums`, the whole protocol in one process (tests, simulation).

The threat model and the test behind each claim: SECURITY.md, "Secure aggregation".
"""

from fediim.protocol.secure_sum.coordinator import CoordinatorSecureAggregator
from fediim.protocol.secure_sum.driver import Dropout, Phase, SecureSumResult, secure_sums
from fediim.protocol.secure_sum.messages import (
    AdvertisementBroadcast,
    KeyAdvertisement,
    MaskedInput,
    MaskedInputRequest,
    SecureSumMessage,
    ShareBundle,
    ShareDelivery,
    UnmaskReply,
    UnmaskRequest,
)
from fediim.protocol.secure_sum.params import (
    SecureAggregationError,
    SecureSumConfig,
    check_headroom,
    check_threshold,
    default_threshold,
)
from fediim.protocol.secure_sum.site import SiteSecureAggregator

__all__ = ["AdvertisementBroadcast", "CoordinatorSecureAggregator", "Dropout",
           "KeyAdvertisement", "MaskedInput", "MaskedInputRequest", "Phase",
           "SecureAggregationError", "SecureSumConfig", "SecureSumMessage", "SecureSumResult",
           "ShareBundle", "ShareDelivery", "SiteSecureAggregator", "UnmaskReply",
           "UnmaskRequest", "check_headroom", "check_threshold", "default_threshold",
           "secure_sums"]
