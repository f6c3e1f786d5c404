"""Site identities: which SuperNode may speak for which site id.

A site id is only the name a site's own TOML gives it, so without more a node can claim any
site's id. To bind ids to nodes, each site holds a private key (its TOML's ``site_key``:
Ed25519 or ECDSA on a NIST curve, PEM or OpenSSH format, so the SuperNode's own
node-authentication key will do) whose public key the coordinator's operator registered
out of band in a *site registry*, named by the run config's ``site-registry``::

    # fediim site registry: site id -> public key, registered out of band
    [sites]
    hospital-a = "keys/hospital-a.pub"   # relative to this file; PEM or OpenSSH

At the handshake the coordinator sends a fresh random nonce; the site signs this canonical
document with its key, and the coordinator admits the site only if the signature verifies
under the key registered for the id it claims::

    {"format": "fediim-site-handshake/1", "node_id": 7, "nonce": "...", "run_id": 123,
     "site_id": "hospital-a"}

The nonce and the run id make a signature worthless in any other run (no replay); the node
id makes it worthless from any other SuperNode of the same run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fediim.errors import ConfigError, SignatureError, SigningKeyError
from fediim.io.toml import read_toml, toml_document
from fediim.protocol.signing import key_id, read_key_file
from fediim.protocol.site_config import SITE_ID_PATTERN

__all__ = ["HANDSHAKE_FORMAT", "SitePrivateKey", "SitePublicKey", "SiteRegistry",
           "handshake_payload", "load_site_private_key", "load_site_public_key",
           "load_site_registry", "payload_signature_verifies", "sign_handshake",
           "sign_payload", "site_key_id", "site_registry_toml", "verify_handshake"]

HANDSHAKE_FORMAT = "fediim-site-handshake/1"

SitePrivateKey = Ed25519PrivateKey | ec.EllipticCurvePrivateKey
SitePublicKey = Ed25519PublicKey | ec.EllipticCurvePublicKey

#: ECDSA's hash for each NIST curve size, as SSH's ``ecdsa-sha2-nistp*`` keys use them.
_ECDSA_HASHES: dict[int, type[hashes.HashAlgorithm]] = {
    256: hashes.SHA256, 384: hashes.SHA384, 521: hashes.SHA512}


def _check_key_type(key: Any, path: str | os.PathLike[str]) -> None:
    """Refuse anything but an Ed25519 or NIST-curve ECDSA key."""
    if isinstance(key, Ed25519PrivateKey | Ed25519PublicKey):
        return
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) and (
            key.curve.key_size in _ECDSA_HASHES):
        return
    raise SigningKeyError(f"{os.fspath(path)}: expected an Ed25519 or ECDSA (NIST P-256, "
                          f"P-384, P-521) key, got {type(key).__name__}")


def load_site_private_key(path: str | os.PathLike[str]) -> SitePrivateKey:
    """A site's private key: PEM (PKCS#8 or traditional) or OpenSSH, unencrypted."""
    data = read_key_file(path, "site private key")
    try:
        if data.lstrip().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----"):
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SigningKeyError(f"{os.fspath(path)}: not an unencrypted PEM or OpenSSH "
                              f"private key ({exc})") from None
    _check_key_type(key, path)
    return key  # type: ignore[return-value]


def load_site_public_key(path: str | os.PathLike[str]) -> SitePublicKey:
    """A registered site public key: PEM (SubjectPublicKeyInfo) or one OpenSSH line."""
    data = read_key_file(path, "site public key")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SigningKeyError(f"{os.fspath(path)}: not a PEM or OpenSSH public key "
                              f"({exc})") from None
    _check_key_type(key, path)
    return key  # type: ignore[return-value]


def site_key_id(key: SitePrivateKey | SitePublicKey) -> str:
    """A site key's id: ``ed25519:`` as :func:`~fediim.protocol.signing.key_id`, or
    ``ecdsa-<curve>:`` + SHA-256 of the DER public key (hex)."""
    public = key.public_key() if isinstance(
        key, Ed25519PrivateKey | ec.EllipticCurvePrivateKey) else key
    if isinstance(public, Ed25519PublicKey):
        return key_id(public)
    der = public.public_bytes(serialization.Encoding.DER,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"ecdsa-{public.curve.name}:" + hashlib.sha256(der).hexdigest()


def sign_payload(key: SitePrivateKey, payload: bytes) -> bytes:
    """A site key's signature over canonical ``payload`` bytes (Ed25519, or ECDSA with the
    curve's hash); every site-signed document (handshake, secure-aggregation keys) uses it."""
    if isinstance(key, Ed25519PrivateKey):
        return key.sign(payload)
    return key.sign(payload, ec.ECDSA(_ECDSA_HASHES[key.curve.key_size]()))


def payload_signature_verifies(public_key: SitePublicKey, signature: bytes,
                               payload: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s signature over ``payload``."""
    try:
        if isinstance(public_key, Ed25519PublicKey):
            public_key.verify(signature, payload)
        else:
            public_key.verify(signature, payload,
                              ec.ECDSA(_ECDSA_HASHES[public_key.curve.key_size]()))
    except InvalidSignature:
        return False
    return True


def handshake_payload(*, run_id: int, nonce: str, site_id: str, node_id: int) -> bytes:
    """The canonical bytes a site signs at the handshake (see module docstring)."""
    doc = {"format": HANDSHAKE_FORMAT, "run_id": int(run_id), "nonce": str(nonce),
           "site_id": str(site_id), "node_id": int(node_id)}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


def sign_handshake(key: SitePrivateKey, *, run_id: int, nonce: str, site_id: str,
                   node_id: int) -> bytes:
    """The site's signature over this run's handshake."""
    return sign_payload(key, handshake_payload(run_id=run_id, nonce=nonce, site_id=site_id,
                                               node_id=node_id))


def verify_handshake(public_key: SitePublicKey, signature: bytes, *, run_id: int, nonce: str,
                     site_id: str, node_id: int) -> None:
    """Raise :class:`SignatureError` unless ``signature`` signs this handshake."""
    payload = handshake_payload(run_id=run_id, nonce=nonce, site_id=site_id, node_id=node_id)
    if not payload_signature_verifies(public_key, signature, payload):
        raise SignatureError(
            f"the handshake signature does not verify under the key registered for site "
            f"{site_id!r} ({site_key_id(public_key)}) for this run, nonce and node")


@dataclass(frozen=True)
class SiteRegistry:
    """The coordinator's registered site keys: site id -> public key."""

    source: str
    keys: Mapping[str, SitePublicKey]

    def public_key(self, site_id: str) -> SitePublicKey | None:
        """The key registered for ``site_id``, or None if the id is not registered."""
        return self.keys.get(site_id)


def _registry_entries(raw: dict[str, Any], source: str) -> dict[str, str]:
    """The registry's ``[sites]`` table, checked: site id -> key file name."""
    unknown = sorted(set(raw) - {"sites"})
    if unknown or not isinstance(raw.get("sites"), dict):
        raise ConfigError(f"{source}: a site registry holds one [sites] table (site id = "
                          f"public key file){'; unknown keys ' + str(unknown) if unknown else ''}")
    entries: dict[str, str] = raw["sites"]
    for site_id, value in entries.items():
        if not re.match(SITE_ID_PATTERN, site_id) or not isinstance(value, str) or not value:
            raise ConfigError(f"{source}: entry {site_id!r} must map a valid site id to the "
                              "name of its public key file")
    return entries


def load_site_registry(path: str | os.PathLike[str]) -> SiteRegistry:
    """Read a site registry (see module docstring); :class:`ConfigError` names the file."""
    source = os.fspath(path)
    raw = read_toml(path, ConfigError, "site registry")
    base = Path(source).resolve().parent
    keys: dict[str, SitePublicKey] = {}
    for site_id, key_file in _registry_entries(raw, source).items():
        try:
            keys[site_id] = load_site_public_key(base / Path(key_file).expanduser())
        except SigningKeyError as exc:
            raise ConfigError(f"{source}: site {site_id!r}: {exc}") from None
    return SiteRegistry(source=source, keys=keys)


def site_registry_toml(public_keys: Mapping[str, str | os.PathLike[str]]) -> str:
    """A site registry that :func:`load_site_registry` reads back (site id -> key file)."""
    return toml_document({"sites": {site_id: os.fspath(path)
                                    for site_id, path in public_keys.items()}},
                         header="fediim site registry: site id -> public key, registered "
                                "out of band")
