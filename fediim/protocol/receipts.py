"""Spend receipts: the coordinator's signed acknowledgement of what a site reported spending.

After a site's release the coordinator signs a receipt (site id, run id, the ρ charged in
this run, the site's reported cumulative ρ spent, the time) with its Ed25519 signing key,
keeps it in its spend record (the last receipt per site, across runs) and sends it to the
site with the impute request. The site verifies it under its pinned coordinator key and
appends it to its receipts file next to its ledger (:func:`receipts_path`); at every later
handshake the coordinator refuses a site whose reported cumulative spend is lower than its
last receipt's. What is signed is the receipt's canonical JSON (:meth:`SpendReceipt.payload`)::

    {"coordinator_key_id": "ed25519:...", "format": "fediim-spend-receipt/1",
     "issued_at": "2025-01-01T12:00:00+00:00", "rho_charged": 0.25,
     "rho_spent_total": 0.5, "run_id": 123, "site_id": "hospital-a"}

What this protects:

- a site whose ledger was deleted, restored from an old copy or rewound (by accident or on
  purpose) is refused, with the reason, by a coordinator that acknowledged its earlier
  spend, instead of spending its budget a second time without anyone noticing;
- the site keeps an audit trail: what it spent in which run, acknowledged by which
  coordinator key, every line verifiable later with the pinned key.

What it does not protect:

- a site reports its own ledger: a coordinator cannot stop a site that lies consistently
  (never reports its real spend), nor one that comes back under a fresh identity (a new
  site id, and with a registry a newly registered key): there is no record to compare with;
- each coordinator knows only the spend reported to it; a ledger shared by several
  federations is compared against each coordinator's own record;
- without a site registry a site id is only a claim: a node that claims another site's id
  can raise that site's record and so get it refused at its next run (a visible refusal,
  not a privacy loss); configure ``site-registry`` to bind ids to keys;
- a receipt reaches a site only if the site stays in the run until the impute stage; the
  coordinator's record is updated after every release either way.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fediim.errors import SignatureError
from fediim.io.validation import FiniteFloat
from fediim.protocol.signing import key_id

__all__ = [
    "RECEIPT_FORMAT",
    "SignedReceipt",
    "SpendReceipt",
    "append_receipt",
    "issue_receipt",
    "read_receipts",
    "receipts_path",
    "verify_receipt",
]

RECEIPT_FORMAT = "fediim-spend-receipt/1"


class SpendReceipt(BaseModel):
    """What the coordinator acknowledges about one site's spend after one release."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["fediim-spend-receipt/1"] = RECEIPT_FORMAT
    site_id: str = Field(min_length=1)
    run_id: int
    rho_charged: FiniteFloat = Field(ge=0)  # this run's charge, as reported by the site
    rho_spent_total: FiniteFloat = Field(ge=0)  # the site's reported cumulative spend
    issued_at: str  # ISO 8601, UTC
    coordinator_key_id: str = Field(min_length=1)

    def payload(self) -> bytes:
        """The canonical bytes that are signed."""
        return json.dumps(self.model_dump(), sort_keys=True, separators=(",", ":"),
                          allow_nan=False).encode("utf-8")


@dataclass(frozen=True)
class SignedReceipt:
    """A receipt's signed bytes and the coordinator's Ed25519 signature over them."""

    payload: bytes
    signature: bytes

    @property
    def receipt(self) -> SpendReceipt:
        """The receipt these bytes hold (unverified: use :func:`verify_receipt` first)."""
        try:
            return SpendReceipt.model_validate_json(self.payload)
        except ValidationError as exc:
            raise SignatureError(f"not a spend receipt ({exc.error_count()} problem(s))") from None

    def to_json(self) -> str:
        """One line of a receipts file."""
        return json.dumps({"receipt": self.payload.decode("utf-8"),
                           "signature": self.signature.hex()}, sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> SignedReceipt:
        """Inverse of :meth:`to_json` (ValueError if the line is not one)."""
        doc = json.loads(line)
        if not isinstance(doc, dict) or set(doc) != {"receipt", "signature"}:
            raise ValueError("a receipt line holds 'receipt' and 'signature'")
        return cls(str(doc["receipt"]).encode("utf-8"), bytes.fromhex(str(doc["signature"])))


def issue_receipt(key: Ed25519PrivateKey, *, site_id: str, run_id: int, rho_charged: float,
                  rho_spent_total: float, issued_at: datetime | None = None) -> SignedReceipt:
    """Sign a receipt for one site's release in this run (``issued_at`` defaults to now)."""
    when = (issued_at or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="seconds")
    receipt = SpendReceipt(site_id=site_id, run_id=int(run_id), rho_charged=float(rho_charged),
                           rho_spent_total=float(rho_spent_total), issued_at=when,
                           coordinator_key_id=key_id(key))
    payload = receipt.payload()
    return SignedReceipt(payload, key.sign(payload))


def verify_receipt(public_key: Ed25519PublicKey, signed: SignedReceipt) -> SpendReceipt:
    """The receipt, once its signature verifies under ``public_key``; else
    :class:`SignatureError`."""
    try:
        public_key.verify(signed.signature, signed.payload)
    except InvalidSignature:
        raise SignatureError("the spend receipt's signature does not verify under the pinned "
                             f"coordinator key ({key_id(public_key)})") from None
    receipt = signed.receipt
    if receipt.coordinator_key_id != key_id(public_key):
        raise SignatureError(f"the spend receipt names key {receipt.coordinator_key_id}, not "
                             f"the key that signed it ({key_id(public_key)})")
    return receipt


def receipts_path(ledger: str | os.PathLike[str]) -> Path:
    """A site's receipts file, next to its ledger: ``ledger.json`` -> ``ledger.receipts.jsonl``."""
    return Path(ledger).with_suffix(".receipts.jsonl")


def append_receipt(path: str | os.PathLike[str], signed: SignedReceipt) -> None:
    """Append one receipt line to ``path`` (created if absent; earlier lines are never
    rewritten), flushed to disk before returning."""
    line = (signed.to_json() + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_receipts(path: str | os.PathLike[str]) -> list[SignedReceipt]:
    """Every receipt in a receipts file, oldest first (unverified)."""
    text = Path(path).read_text(encoding="utf-8")
    return [SignedReceipt.from_json(line) for line in text.splitlines() if line.strip()]
