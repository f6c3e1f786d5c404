"""Ed25519 signatures on the federation's model bank.

The coordinator signs the bank it sends back to the sites; a site imputes only from a bank
whose signature verifies under the coordinator public key *pinned in its own configuration*
(no trust on first use: the key is distributed out of band, like the TLS CA certificate).

What is signed is a small canonical JSON document binding the bank's SHA-256 to the schema
hash and the Flower run id, so a bank cannot be replayed into another run or schema::

    {"bank_sha256": "...", "format": "fediim-bank-signature/1", "run_id": 123,
     "schema_hash": "..."}

Key files are PEM (PKCS#8 private key, written 0600; SubjectPublicKeyInfo public key,
written 0644).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fediim.errors import SignatureError, SigningKeyError
from fediim.io.atomic import atomic_write_public, atomic_write_secret, atomic_write_text

__all__ = [
    "SIGNATURE_FORMAT",
    "SignatureError",
    "SigningKeyError",
    "bank_signing_payload",
    "key_id",
    "load_private_key",
    "load_public_key",
    "read_key_file",
    "read_signature_file",
    "sign_bank",
    "signature_json",
    "verify_bank",
    "write_keypair",
    "write_signature_file",
]

SIGNATURE_FORMAT = "fediim-bank-signature/1"


def write_keypair(private_path: str | os.PathLike[str],
                  public_path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Generate an Ed25519 key pair: private key 0600 at ``private_path``, public key PEM
    0644 at ``public_path`` (whatever the umask: sites read it, nobody else may replace it)."""
    key = Ed25519PrivateKey.generate()
    atomic_write_secret(private_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    pub = key.public_key()
    atomic_write_public(public_path, pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return pub


def read_key_file(path: str | os.PathLike[str], what: str) -> bytes:
    """The bytes of a key file; :class:`SigningKeyError` names the file and ``what`` it is."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise SigningKeyError(f"{os.fspath(path)}: {what} not found") from None
    except OSError as exc:
        raise SigningKeyError(f"{os.fspath(path)}: cannot read {what} ({exc.strerror})") from None


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """The coordinator's Ed25519 private key (PEM, unencrypted PKCS#8)."""
    data = read_key_file(path, "signing private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{os.fspath(path)}: not a PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{os.fspath(path)}: expected an Ed25519 key, got "
                              f"{type(key).__name__}")
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """A pinned coordinator public key (PEM SubjectPublicKeyInfo)."""
    data = read_key_file(path, "coordinator public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{os.fspath(path)}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{os.fspath(path)}: expected an Ed25519 key, got "
                              f"{type(key).__name__}")
    return key


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """A public key's id: ``ed25519:`` + SHA-256 of its raw 32 bytes (hex)."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()


def bank_signing_payload(bank_bytes: bytes, schema_hash: str, run_id: int) -> bytes:
    """The canonical bytes that are signed (see module docstring)."""
    doc: dict[str, Any] = {
        "format": SIGNATURE_FORMAT,
        "bank_sha256": hashlib.sha256(bank_bytes).hexdigest(),
        "schema_hash": str(schema_hash),
        "run_id": int(run_id),
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("ascii")


def sign_bank(key: Ed25519PrivateKey, bank_bytes: bytes, schema_hash: str, run_id: int) -> bytes:
    """The 64-byte Ed25519 signature of the bank in this run under this schema."""
    return key.sign(bank_signing_payload(bank_bytes, schema_hash, run_id))


def verify_bank(key: Ed25519PublicKey, signature: bytes, bank_bytes: bytes, schema_hash: str,
                run_id: int) -> None:
    """Raise :class:`SignatureError` unless ``signature`` signs this bank, schema and run."""
    try:
        key.verify(signature, bank_signing_payload(bank_bytes, schema_hash, run_id))
    except InvalidSignature:
        raise SignatureError(
            "the model bank's signature does not verify under the pinned coordinator key "
            f"({key_id(key)}) for this run and schema; refusing to use it") from None


def signature_json(signature: bytes, bank_bytes: bytes, schema_hash: str, run_id: int,
                   signer: str) -> str:
    """The sidecar JSON saved next to a bank (``bank.sig.json``), so it can be re-verified
    later with :func:`read_signature_file` and :func:`verify_bank`."""
    doc = {
        "format": SIGNATURE_FORMAT, "signature": signature.hex(), "key_id": signer,
        "bank_sha256": hashlib.sha256(bank_bytes).hexdigest(), "schema_hash": schema_hash,
        "run_id": int(run_id),
    }
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def write_signature_file(path: str | os.PathLike[str], signature: bytes, bank_bytes: bytes,
                         schema_hash: str, run_id: int, signer: str) -> None:
    """Write :func:`signature_json` atomically to ``path``."""
    atomic_write_text(path, signature_json(signature, bank_bytes, schema_hash, run_id, signer))


def read_signature_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Inverse of :func:`write_signature_file` (``signature`` as bytes)."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    doc["signature"] = bytes.fromhex(doc["signature"])
    return doc
