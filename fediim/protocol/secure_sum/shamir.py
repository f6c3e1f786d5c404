"""Shamir secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

A secret s is the constant term of a polynomial f of degree t - 1 whose other t - 1
coefficients are uniform in the field (``secrets.randbelow``); share i is (x_i, f(x_i)) with
distinct nonzero public x_i (here a site's 1-based position in the run's sorted site list).
Any t shares determine f, hence s = f(0), by Lagrange interpolation. Any t - 1 shares reveal
nothing: for *every* candidate secret s' there is exactly one polynomial of degree t - 1
through (0, s') and those t - 1 points, and since the t - 1 random coefficients are uniform,
the t - 1 share values are uniform and independent of s; shares of two different secrets at
the same t - 1 points are identically distributed. ``tests/protocol/test_secure_sum_shamir.py``
checks both directions (t shares reconstruct; t - 1 shares plus a forged share give any
value the forger likes).

The field is a Mersenne prime larger than 2^256, so every 32-byte secret is a field
element; a share value is written as :data:`SHARE_BYTES` big-endian bytes.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping

from fediim.protocol.secure_sum.params import SecureAggregationError

__all__ = ["PRIME", "SHARE_BYTES", "interpolate", "recover_secret", "share_from_bytes",
           "share_to_bytes", "split_secret"]

PRIME = 2 ** 521 - 1
SHARE_BYTES = (PRIME.bit_length() + 7) // 8  # 66


def split_secret(secret: bytes, threshold: int, xs: Iterable[int]) -> dict[int, int]:
    """Shares of ``secret`` (at most 65 bytes, read big-endian) at the points ``xs``: any
    ``threshold`` of them reconstruct it, fewer reveal nothing."""
    points = list(xs)
    if threshold < 1 or len(points) < threshold or len(set(points)) != len(points) or any(
            not 0 < x < PRIME for x in points):
        raise SecureAggregationError(f"cannot share among points {points} with threshold "
                                     f"{threshold}: need at least t distinct nonzero points")
    value = int.from_bytes(secret, "big")
    if value >= PRIME:
        raise SecureAggregationError("a secret must be smaller than the field")
    coefficients = [value] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in points:
        y = 0
        for coefficient in reversed(coefficients):  # Horner
            y = (y * x + coefficient) % PRIME
        shares[x] = y
    return shares


def interpolate(points: Mapping[int, int], at: int) -> int:
    """The value at ``at`` of the polynomial of degree len(points) - 1 through ``points``."""
    total = 0
    for xi, yi in points.items():
        numerator, denominator = 1, 1
        for xj in points:
            if xj != xi:
                numerator = numerator * (at - xj) % PRIME
                denominator = denominator * (xi - xj) % PRIME
        total = (total + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    return total


def recover_secret(shares: Mapping[int, int], threshold: int, secret_bytes: int = 32) -> bytes:
    """The ``secret_bytes``-byte secret behind ``shares`` (any ``threshold`` or more).

    The first ``threshold`` shares (by x) interpolate the polynomial; every further share
    must lie on it, and the secret must fit in ``secret_bytes`` bytes: shares that fail
    either check were corrupted, and :class:`SecureAggregationError` says so."""
    if len(shares) < threshold:
        raise SecureAggregationError(f"{len(shares)} shares cannot reconstruct a secret "
                                     f"shared with threshold {threshold}")
    xs = sorted(shares)
    basis = {x: shares[x] % PRIME for x in xs[:threshold]}
    for x in xs[threshold:]:
        if interpolate(basis, x) != shares[x] % PRIME:
            raise SecureAggregationError(f"share at x = {x} is inconsistent with the others")
    value = interpolate(basis, 0)
    if value >= 2 ** (8 * secret_bytes):
        raise SecureAggregationError("the shares do not reconstruct a secret of the "
                                     "expected size: at least one share is wrong")
    return value.to_bytes(secret_bytes, "big")


def share_to_bytes(value: int) -> bytes:
    """A share value as :data:`SHARE_BYTES` big-endian bytes."""
    return value.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes) -> int:
    """A share value read back; :class:`SecureAggregationError` unless it is a field element."""
    if len(data) != SHARE_BYTES or (value := int.from_bytes(data, "big")) >= PRIME:
        raise SecureAggregationError(f"a share is {SHARE_BYTES} bytes holding a field element")
    return value
