"""Masks in Z_{2^64}: the ChaCha20 PRG, pairwise mask seeds, and the group conversions.

A site's masked input for session k is

    y_u = x_u + PRG(b_u^(k)) + sum_{v > u} PRG(s_uv^(k)) - sum_{v < u} PRG(s_uv^(k))

over the session's participants v (ordered by site id), mod 2^64. ``b_u^(k)`` is the site's
own 32-byte self-mask seed; ``s_uv^(k)`` is HKDF-SHA256 over X25519(s_u^(k), s_v^(k)) bound
to the run, the session and the pair, so u and v derive the same seed and their two
masks cancel in the sum. The PRG is the ChaCha20 keystream under the seed, with the session
index and a domain tag in the nonce, read as little-endian uint64.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fediim.protocol.secure_sum.keys import derive_key, shared_secret

__all__ = ["PAIR_DOMAIN", "SELF_DOMAIN", "from_group", "pair_mask_sum", "pair_seed",
           "prg", "to_group"]

SELF_DOMAIN = b"self"
PAIR_DOMAIN = b"pair"


def prg(seed: bytes, session: int, length: int, domain: bytes) -> np.ndarray:
    """``length`` uint64 words of the ChaCha20 keystream under ``seed`` (32 bytes); the
    16-byte nonce is a zero block counter, the 4-byte ``domain`` and the session index."""
    nonce = struct.pack("<I", 0) + domain + struct.pack("<Q", session)
    encryptor = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor()
    stream = encryptor.update(bytes(8 * length))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64)


def pair_seed(s_private: X25519PrivateKey, peer_s_public: bytes, *, run_id: int, session: int,
              site: str, peer: str) -> bytes:
    """s_uv for ``site`` and ``peer`` in this session (the same from either side)."""
    low, high = sorted((site, peer))
    return derive_key(shared_secret(s_private, peer_s_public, peer), "pair-mask",
                      run_id=run_id, session=session, pair=[low, high])


def pair_mask_sum(site: str, s_private: X25519PrivateKey, peer_s_publics: Mapping[str, bytes],
                  *, run_id: int, session: int, length: int) -> np.ndarray:
    """sum_{v > site} PRG(s_uv) - sum_{v < site} PRG(s_uv) over ``peer_s_publics`` (mod 2^64):
    ``site``'s pairwise masks, or (with a reconstructed key) a dropped site's seen from
    its peers, negated."""
    total = np.zeros(length, dtype=np.uint64)
    for peer, peer_public in sorted(peer_s_publics.items()):
        if peer == site:
            continue
        seed = pair_seed(s_private, peer_public, run_id=run_id, session=session, site=site,
                         peer=peer)
        mask = prg(seed, session, length, PAIR_DOMAIN)
        if peer > site:
            total += mask
        else:
            total -= mask
    return total


def to_group(vector: np.ndarray) -> np.ndarray:
    """An int64 vector as Z_{2^64} elements (two's complement: the same bits as uint64)."""
    return np.ascontiguousarray(vector, dtype=np.int64).view(np.uint64)


def from_group(vector: np.ndarray) -> np.ndarray:
    """Z_{2^64} elements read back as int64 (two's complement)."""
    return np.ascontiguousarray(vector, dtype=np.uint64).view(np.int64).copy()
