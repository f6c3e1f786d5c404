"""The secure sum's key material: X25519 agreement, HKDF-SHA256, and the share channel.

Each site holds one X25519 key pair ``c`` for the share channel and one ``s`` pair per
session for the pairwise masks. Every derived key is HKDF-SHA256 over an X25519 shared
secret with an ``info`` that is a canonical JSON document naming its purpose, the run and
the parties, so no key serves two purposes, two runs or two pairs. Shares travel to their
recipient under ChaCha20-Poly1305 with a key for (run, sender, recipient) in that
direction and associated data binding the same three: the coordinator routes ciphertexts
it can neither read nor redirect undetected.
"""

from __future__ import annotations

import json
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fediim.protocol.secure_sum.params import SecureAggregationError

__all__ = ["FORMAT", "KEY_BYTES", "canonical_json", "decrypt_for", "derive_key",
           "encrypt_for", "public_bytes", "shared_secret"]

#: The protocol's format tag: in every message, signature payload and HKDF info.
FORMAT = "fediim-secagg/1"
KEY_BYTES = 32
_NONCE_BYTES = 12


def canonical_json(doc: dict[str, Any]) -> bytes:
    """``doc`` as canonical JSON bytes (sorted keys, no spaces): what is signed or bound."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of ``key``'s public key."""
    return key.public_key().public_bytes_raw()


def shared_secret(private: X25519PrivateKey, peer_public: bytes, peer: str) -> bytes:
    """X25519(``private``, ``peer_public``); a low-order or malformed peer key is refused."""
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        raise SecureAggregationError(f"site {peer!r}'s X25519 key is malformed or of low "
                                     "order; refused") from None


def derive_key(secret: bytes, purpose: str, **binding: Any) -> bytes:
    """32 bytes of HKDF-SHA256 from ``secret``, bound to ``purpose`` and ``binding``."""
    info = canonical_json({"format": FORMAT, "purpose": purpose, **binding})
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def _channel(c_private: X25519PrivateKey, peer_c_public: bytes, peer: str, *, run_id: int,
             sender: str, recipient: str) -> tuple[ChaCha20Poly1305, bytes]:
    """The AEAD and associated data of the share channel sender -> recipient."""
    binding = {"run_id": run_id, "sender": sender, "recipient": recipient}
    key = derive_key(shared_secret(c_private, peer_c_public, peer), "share-channel", **binding)
    return ChaCha20Poly1305(key), canonical_json({"format": FORMAT, **binding})


def encrypt_for(plaintext: bytes, c_private: X25519PrivateKey, recipient_c_public: bytes, *,
                run_id: int, sender: str, recipient: str) -> bytes:
    """``plaintext`` for ``recipient`` only: random nonce || ChaCha20-Poly1305 ciphertext."""
    aead, associated = _channel(c_private, recipient_c_public, recipient, run_id=run_id,
                                sender=sender, recipient=recipient)
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + aead.encrypt(nonce, plaintext, associated)


def decrypt_for(ciphertext: bytes, c_private: X25519PrivateKey, sender_c_public: bytes, *,
                run_id: int, sender: str, recipient: str) -> bytes:
    """The plaintext ``sender`` encrypted for ``recipient`` in this run, or
    :class:`SecureAggregationError` if it was altered, redirected or replayed."""
    aead, associated = _channel(c_private, sender_c_public, sender, run_id=run_id,
                                sender=sender, recipient=recipient)
    try:
        return aead.decrypt(ciphertext[:_NONCE_BYTES], ciphertext[_NONCE_BYTES:], associated)
    except (InvalidTag, ValueError):
        raise SecureAggregationError(f"the shares from site {sender!r} to {recipient!r} do "
                                     "not decrypt: altered, redirected or from another "
                                     "run") from None
