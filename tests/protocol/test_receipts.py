"""Spend receipts (fediim.protocol.receipts) and the coordinator's spend record
(coordinator.spend): receipts verify, tampered ones do not, the site's file only grows, and
a cumulative spend that went down is named as a rewind."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.spend import SpendRecord
from fediim.errors import ConfigError, SignatureError
from fediim.protocol.receipts import (
    SignedReceipt,
    SpendReceipt,
    append_receipt,
    issue_receipt,
    read_receipts,
    receipts_path,
    verify_receipt,
)
from fediim.protocol.signing import key_id

KEY = Ed25519PrivateKey.generate()
WHEN = datetime(2025, 3, 1, 12, 30, tzinfo=UTC)


def _receipt(site_id: str = "site-a", total: float = 0.75, run_id: int = 9) -> SignedReceipt:
    return issue_receipt(KEY, site_id=site_id, run_id=run_id, rho_charged=0.25,
                         rho_spent_total=total, issued_at=WHEN)


def test_a_receipt_verifies_under_the_coordinator_key() -> None:
    """Finding 6: the site can check its receipt with the pinned coordinator key."""
    receipt = verify_receipt(KEY.public_key(), _receipt())
    assert receipt == SpendReceipt(site_id="site-a", run_id=9, rho_charged=0.25,
                                   rho_spent_total=0.75, issued_at="2025-03-01T12:30:00+00:00",
                                   coordinator_key_id=key_id(KEY))
    assert json.loads(_receipt().payload)["format"] == "fediim-spend-receipt/1"


def test_a_tampered_receipt_does_not_verify() -> None:
    """Finding 6: a changed receipt, a changed signature or another key is refused."""
    signed = _receipt()
    forged = signed.payload.replace(b'"rho_spent_total":0.75', b'"rho_spent_total":0.05')
    assert forged != signed.payload
    cases = [SignedReceipt(forged, signed.signature),
             SignedReceipt(signed.payload, bytes([signed.signature[0] ^ 1]) + signed.signature[1:]),
             SignedReceipt(signed.payload, b"")]
    for case in cases:
        with pytest.raises(SignatureError, match="does not verify"):
            verify_receipt(KEY.public_key(), case)
    with pytest.raises(SignatureError, match="does not verify"):
        verify_receipt(Ed25519PrivateKey.generate().public_key(), signed)


def test_a_receipt_signed_by_one_key_naming_another_is_refused() -> None:
    other = Ed25519PrivateKey.generate()
    payload = SpendReceipt(site_id="a", run_id=1, rho_charged=0.0, rho_spent_total=0.0,
                           issued_at="x", coordinator_key_id=key_id(other)).payload()
    with pytest.raises(SignatureError, match="names key"):
        verify_receipt(KEY.public_key(), SignedReceipt(payload, KEY.sign(payload)))


def test_the_receipts_file_only_grows_and_reads_back(tmp_path: Path) -> None:
    path = receipts_path(tmp_path / "ledger.json")
    assert path.name == "ledger.receipts.jsonl"
    first, second = _receipt(total=0.5, run_id=1), _receipt(total=0.75, run_id=2)
    append_receipt(path, first)
    written = path.read_bytes()
    append_receipt(path, second)
    assert path.read_bytes().startswith(written)
    assert read_receipts(path) == [first, second]
    assert [verify_receipt(KEY.public_key(), r).run_id for r in read_receipts(path)] == [1, 2]


def test_the_spend_record_names_a_rewind_and_survives_a_reload(tmp_path: Path) -> None:
    """Finding 6: the coordinator keeps each site's last receipt across runs and names a
    lower reported spend as a rewound ledger."""
    (tmp_path / "signing.key").write_bytes(b"")
    record = SpendRecord.beside_key(tmp_path / "signing.key")
    assert record.rewind_reason("site-a", 0.0) is None  # nothing acknowledged yet
    record.file(_receipt(total=0.75))
    record.save()
    reloaded = SpendRecord.beside_key(tmp_path / "signing.key")
    assert reloaded.last("site-a") == _receipt(total=0.75).receipt
    assert reloaded.rewind_reason("site-a", 0.75) is None
    assert reloaded.rewind_reason("site-a", 0.9) is None
    reason = reloaded.rewind_reason("site-a", 0.1)
    assert reason is not None and "rho=0.1, lower than the rho=0.75" in reason
    assert "run 9 (2025-03-01T12:30:00+00:00)" in reason
    assert reloaded.rewind_reason("site-b", 0.0) is None


def test_a_spend_record_filing_a_receipt_under_another_site_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "spend-record.json"
    entry = json.loads(_receipt(site_id="site-b").to_json())
    path.write_text(json.dumps({"format": "fediim-spend-record/1", "sites": {"site-a": entry}}))
    with pytest.raises(ConfigError, match="another site's"):
        SpendRecord.load(path)
