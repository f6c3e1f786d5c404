"""A site's signed model bank, loaded again after the run: "train once, impute every day".

After a run each site keeps the federation bank (``bank.npz``) and the coordinator's
signature over it (``bank.sig.json``, see :func:`fediim.protocol.signing.signature_json`).
:func:`load_signed_bank` re-checks that signature under the site's *pinned* coordinator key
and the site's schema hash before a single byte of the bank is parsed, refuses a bank
older than the site allows, and only then parses it. Every refusal is a
:class:`~fediim.errors.BankError`, :class:`~fediim.errors.SignatureError` or
:class:`~fediim.errors.SigningKeyError` whose message names the file and what is wrong.

The signature sidecar records no time, so a bank's age is that of its file (mtime): the
site writes the bank when it receives it, at the end of the run.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fediim.errors import BankError, SignatureError
from fediim.federated.bank import ModelBank
from fediim.protocol.signing import (
    SIGNATURE_FORMAT,
    key_id,
    load_public_key,
    read_signature_file,
    verify_bank,
)

__all__ = ["SignedBank", "load_signed_bank"]

_SECONDS_PER_DAY = 86400.0


@dataclass(frozen=True)
class SignedBank:
    """A bank whose signature verified, with what the signature vouches for."""

    bank: ModelBank
    run_id: int  # the Flower run that produced it (covered by the signature)
    key_id: str  # the pinned coordinator key it verified under
    saved_at: datetime  # when the site stored it (the bank file's mtime, UTC)


def _read_bank_bytes(bank_path: Path) -> bytes:
    try:
        return bank_path.read_bytes()
    except FileNotFoundError:
        raise BankError(f"{bank_path}: model bank not found (the site keeps it after a "
                        "federation run; join one, or set 'bank' in the site TOML)") from None
    except OSError as exc:
        raise BankError(f"{bank_path}: cannot read the model bank ({exc.strerror})") from None


def _read_signature(signature_path: Path) -> dict[str, Any]:
    """The signature sidecar, with every field it must have of the right type."""
    try:
        doc = read_signature_file(signature_path)
    except FileNotFoundError:
        raise SignatureError(f"{signature_path}: bank signature not found") from None
    except OSError as exc:
        raise SignatureError(f"{signature_path}: cannot read the bank signature "
                             f"({exc.strerror})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SignatureError(f"{signature_path}: not a readable bank signature ({exc})") \
            from None
    if doc.get("format") != SIGNATURE_FORMAT:
        raise SignatureError(f"{signature_path}: format {doc.get('format')!r}, expected "
                             f"{SIGNATURE_FORMAT!r}")
    expected = {"run_id": int, "schema_hash": str, "bank_sha256": str, "key_id": str}
    for name, kind in expected.items():
        if not isinstance(doc.get(name), kind) or isinstance(doc.get(name), bool):
            raise SignatureError(f"{signature_path}: field {name!r} is missing or not a "
                                 f"{kind.__name__}")
    return doc


def _check_signature(bank_path: Path, bank_bytes: bytes, signature_path: Path,
                     public_key_path: Path, schema_hash: str) -> dict[str, Any]:
    """The verified sidecar: the bank, the site's schema and the run under the pinned key.

    The plain comparisons first give a precise message; :func:`verify_bank` decides."""
    doc = _read_signature(signature_path)
    public_key = load_public_key(public_key_path)
    pinned = key_id(public_key)
    if doc["key_id"] != pinned:
        raise SignatureError(f"{signature_path}: the bank is signed by key {doc['key_id']}, "
                             f"not by the coordinator key pinned in {public_key_path} "
                             f"({pinned}); refusing it")
    if doc["schema_hash"] != schema_hash:
        raise BankError(f"{bank_path}: the bank is for another schema (hash "
                        f"{doc['schema_hash']}; the site's schema has {schema_hash}); "
                        "refusing it")
    if doc["bank_sha256"] != hashlib.sha256(bank_bytes).hexdigest():
        raise SignatureError(f"{bank_path}: the bank was changed after it was signed (its "
                             f"SHA-256 differs from the one in {signature_path}); refusing it")
    try:
        verify_bank(public_key, doc["signature"], bank_bytes, schema_hash, doc["run_id"])
    except SignatureError as exc:
        raise SignatureError(f"{signature_path}: {exc}") from None
    return doc


def _check_age(bank_path: Path, max_age_days: float | None, now: float) -> datetime:
    """When the bank was stored; a :class:`BankError` if that is over ``max_age_days`` ago."""
    try:
        saved = bank_path.stat().st_mtime
    except OSError as exc:  # pragma: no cover - it was just read
        raise BankError(f"{bank_path}: cannot stat the model bank ({exc.strerror})") from None
    saved_at = datetime.fromtimestamp(saved, tz=UTC)
    age_days = (now - saved) / _SECONDS_PER_DAY
    if max_age_days is not None and age_days > max_age_days:
        raise BankError(f"{bank_path}: the bank is stale: saved {saved_at:%Y-%m-%d}, "
                        f"{age_days:.0f} days ago, more than max_bank_age_days = "
                        f"{max_age_days:g} of the site TOML; join a new federation run")
    return saved_at


def load_signed_bank(bank_path: str | os.PathLike[str],
                     signature_path: str | os.PathLike[str],
                     public_key_path: str | os.PathLike[str],
                     schema_hash: str, *, max_age_days: float | None = None,
                     now: float | None = None) -> SignedBank:
    """The bank at ``bank_path``, once its signature verifies under the pinned key at
    ``public_key_path`` for ``schema_hash`` (the site's schema) and it is at most
    ``max_age_days`` old at ``now`` (seconds since the epoch; default: the current time).

    Nothing of the bank is parsed before the signature verified: a tampered file is
    refused on its bytes, never handed to the npz reader.
    """
    bank_file, signature_file = Path(bank_path), Path(signature_path)
    bank_bytes = _read_bank_bytes(bank_file)
    doc = _check_signature(bank_file, bank_bytes, signature_file, Path(public_key_path),
                           schema_hash)
    saved_at = _check_age(bank_file, max_age_days, time.time() if now is None else now)
    bank = ModelBank.from_bytes(bank_bytes, source=str(bank_file))
    return SignedBank(bank=bank, run_id=int(doc["run_id"]), key_id=str(doc["key_id"]),
                      saved_at=saved_at)
