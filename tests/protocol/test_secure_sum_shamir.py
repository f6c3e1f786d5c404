"""Shamir sharing over GF(2^521 - 1): any t shares reconstruct, t - 1 shares fit any secret."""

from __future__ import annotations

import os
import random

import pytest

from fediim.protocol.secure_sum import SecureAggregationError
from fediim.protocol.secure_sum.shamir import (
    PRIME,
    SHARE_BYTES,
    interpolate,
    recover_secret,
    share_from_bytes,
    share_to_bytes,
    split_secret,
)


@pytest.mark.parametrize(("threshold", "n"), [(2, 2), (2, 5), (3, 4), (5, 7)])
def test_any_t_shares_reconstruct_the_secret(threshold: int, n: int) -> None:
    rng = random.Random(threshold * 100 + n)
    secret = os.urandom(32)
    shares = split_secret(secret, threshold, range(1, n + 1))
    for _ in range(10):
        subset = rng.sample(sorted(shares), rng.randint(threshold, n))
        assert recover_secret({x: shares[x] for x in subset}, threshold) == secret


def test_fewer_than_t_shares_are_refused() -> None:
    shares = split_secret(os.urandom(32), 3, range(1, 5))
    with pytest.raises(SecureAggregationError, match="cannot reconstruct"):
        recover_secret({1: shares[1], 2: shares[2]}, 3)


def test_t_minus_one_shares_are_consistent_with_every_secret() -> None:
    """For any other secret s', the polynomial through (0, s') and t - 1 real shares gives a
    forged t-th share: t - 1 shares plus it reconstruct s', not the secret (so t - 1 shares
    cannot tell the two apart)."""
    threshold, secret, other = 3, os.urandom(32), os.urandom(32)
    shares = split_secret(secret, threshold, range(1, 5))
    known = {1: shares[1], 2: shares[2]}
    forged = interpolate({0: int.from_bytes(other, "big"), **known}, 3)
    assert recover_secret({**known, 3: forged}, threshold) == other != secret
    assert recover_secret({**known, 3: shares[3]}, threshold) == secret


def test_an_inconsistent_extra_share_is_detected() -> None:
    shares = split_secret(os.urandom(32), 2, range(1, 4))
    with pytest.raises(SecureAggregationError, match="inconsistent"):
        recover_secret({**shares, 3: (shares[3] + 1) % PRIME}, 2)


def test_share_bytes_round_trip_and_refuse_non_field_elements() -> None:
    value = PRIME - 1
    assert share_from_bytes(share_to_bytes(value)) == value
    with pytest.raises(SecureAggregationError):
        share_from_bytes(b"\xff" * SHARE_BYTES)
    with pytest.raises(SecureAggregationError):
        share_from_bytes(b"\x00" * (SHARE_BYTES - 1))


def test_splitting_needs_t_distinct_nonzero_points() -> None:
    for points in ([1], [1, 1, 2], [0, 1, 2]):
        with pytest.raises(SecureAggregationError):
            split_secret(b"\x01" * 32, 2, points)
