"""A secure-sum run's public parameters, its error, and the bounds that keep a sum exact.

Every number here is public and announced at setup, before any site holds a key: the
sites of the run, the Shamir threshold ``t``, the number of sessions (secure sums), each
session's vector length or ``None`` when the length is announced with the session's
masked-input request (a later sum's length may follow from an earlier sum), and the
largest absolute entry a site may feed into a sum. The group is Z_{2^64}; inputs
are int64, and :func:`check_headroom` keeps every possible sum inside [-2^62, 2^62), so a
sum of in-bound inputs can never wrap around the group.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from fediim.errors import ExitCode, FediimError
from fediim.protocol.site_config import SITE_ID_PATTERN

__all__ = ["HEADROOM_BITS", "SecureAggregationError", "SecureSumConfig", "check_headroom",
           "check_threshold", "default_threshold"]

#: Every sum of in-bound inputs stays below 2^HEADROOM_BITS in absolute value (one bit
#: under int64's 63 leaves room for the range check of the unmasked sum).
HEADROOM_BITS = 62


class SecureAggregationError(FediimError, RuntimeError):
    """The secure-sum protocol refused to go on: a bad signature, a substituted key, too
    few survivors, a request that would reveal both secrets of one site, an input out of
    bounds. The message names the site and the phase; no partial sum is ever returned."""

    exit_code = ExitCode.FAILED


def check_headroom(max_abs_per_site: int, n_sites: int) -> None:
    """Raise :class:`SecureAggregationError` unless ``n_sites`` inputs, each entry at most
    ``max_abs_per_site`` in absolute value, always sum to less than 2^62 in absolute value
    (so the sum in Z_{2^64}, read as int64, is the integer sum)."""
    if isinstance(max_abs_per_site, bool) or not isinstance(max_abs_per_site, int) or (
            max_abs_per_site < 0):
        raise SecureAggregationError(f"max_abs_per_site must be an int >= 0, got "
                                     f"{max_abs_per_site!r}")
    if isinstance(n_sites, bool) or not isinstance(n_sites, int) or n_sites < 1:
        raise SecureAggregationError(f"n_sites must be an int >= 1, got {n_sites!r}")
    if n_sites * max_abs_per_site >= 2 ** HEADROOM_BITS:
        raise SecureAggregationError(
            f"no headroom: {n_sites} sites x {max_abs_per_site} per site reaches 2^"
            f"{HEADROOM_BITS}; quantise more coarsely or lower the per-site bound")


def default_threshold(n_sites: int) -> int:
    """The recommended Shamir threshold: max(2, ceil(2n/3)).

    A threshold is a trade: t parties together (the coordinator plus t - 1 sites, or t
    sites) can reconstruct a site's masks, while the sum survives up to n - t dropped sites.
    Two thirds keeps every reconstruction behind a clear majority of the sites (honest
    majority style, as Bonawitz et al. recommend) and still tolerates a third dropping;
    2 is the least threshold for which one share reveals nothing."""
    return max(2, math.ceil(2 * n_sites / 3))


def check_threshold(threshold: int, n_sites: int) -> None:
    """Raise :class:`SecureAggregationError` unless 2 <= ``threshold`` <= ``n_sites``."""
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not (
            2 <= threshold <= n_sites):
        raise SecureAggregationError(
            f"threshold must be an int with 2 <= t <= n_sites = {n_sites}, got {threshold!r}")


@dataclass(frozen=True)
class SecureSumConfig:
    """A run's public secure-sum parameters, fixed at setup.

    ``sites`` is every site of the run in sorted order (a site's Shamir x-coordinate is its
    position plus one); ``vector_lengths`` holds one entry per session, so
    ``len(vector_lengths)`` is the run's public number of sessions: the session's length,
    or ``None`` when the coordinator announces it with the session's request."""

    run_id: int
    sites: tuple[str, ...]
    threshold: int
    vector_lengths: tuple[int | None, ...]
    max_abs_per_site: int

    def __post_init__(self) -> None:
        if isinstance(self.run_id, bool) or not isinstance(self.run_id, int) or not (
                0 <= self.run_id < 2 ** 64):
            raise SecureAggregationError(f"run_id must be an int in [0, 2^64), got "
                                         f"{self.run_id!r}")
        sites = tuple(self.sites)
        if len(sites) < 2 or list(sites) != sorted(set(sites)) or not all(
                isinstance(s, str) and re.match(SITE_ID_PATTERN, s) for s in sites):
            raise SecureAggregationError(f"sites must be at least two distinct valid site "
                                         f"ids in sorted order, got {sites!r}")
        check_threshold(self.threshold, len(sites))
        lengths = tuple(self.vector_lengths)
        if not lengths or not all(n is None or (isinstance(n, int) and not isinstance(n, bool)
                                                and n >= 1) for n in lengths):
            raise SecureAggregationError(f"vector_lengths must be one int >= 1 (or None) per "
                                         f"session, got {lengths!r}")
        check_headroom(self.max_abs_per_site, len(sites))
        object.__setattr__(self, "sites", sites)
        object.__setattr__(self, "vector_lengths", lengths)

    @property
    def n_sessions(self) -> int:
        """The run's number of secure sums."""
        return len(self.vector_lengths)

    def session_length(self, session: int, announced: int | None) -> int:
        """Session ``session``'s vector length: the declared one, which an announced length
        must equal, else the announced one; :class:`SecureAggregationError` if neither is
        known or they disagree."""
        declared = self.vector_lengths[session]
        if announced is None and declared is None:
            raise SecureAggregationError(f"session {session}'s vector length is announced "
                                         "with its request, and none was")
        if declared is not None and announced is not None and announced != declared:
            raise SecureAggregationError(f"session {session} was declared of length "
                                         f"{declared}, not {announced}; refused")
        return int(declared if declared is not None else announced)  # type: ignore[arg-type]

    def share_x(self, site_id: str) -> int:
        """``site_id``'s Shamir x-coordinate: its 1-based position in :attr:`sites`."""
        return self.sites.index(site_id) + 1
