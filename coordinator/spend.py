"""The coordinator's spend record: the last spend receipt it signed for each site, kept
across runs, so that a site whose ledger went back is refused (see
:mod:`fediim.protocol.receipts` for what this does and does not protect).

The record lives next to the coordinator's signing key (``spend-record.json`` in the key's
directory: the coordinator's state directory, which outlives every run's ``out-dir``) and is
replaced atomically after every release stage::

    {"format": "fediim-spend-record/1",
     "sites": {"hospital-a": {"receipt": "<signed receipt JSON>", "signature": "<hex>"}}}

One coordinator process at a time should use one state directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fediim.errors import ConfigError, SignatureError
from fediim.io.atomic import atomic_write_text
from fediim.protocol.receipts import SignedReceipt, SpendReceipt

__all__ = ["SPEND_RECORD_FORMAT", "SPEND_RECORD_NAME", "SpendRecord", "spend_went_down"]

SPEND_RECORD_FORMAT = "fediim-spend-record/1"
SPEND_RECORD_NAME = "spend-record.json"
#: Relative float slack: a ledger's sum of charges is recomputed identically, so any real
#: rewind is far larger.
_RTOL = 1e-9


def spend_went_down(reported: float, previous: float) -> bool:
    """Whether a reported cumulative spend is lower than an earlier one."""
    return reported < previous - _RTOL * max(1.0, abs(previous))


class SpendRecord:
    """Every site's last receipt, read from and written to one JSON file."""

    def __init__(self, path: Path, receipts: dict[str, SignedReceipt]) -> None:
        self.path = path
        self._receipts = receipts

    @classmethod
    def beside_key(cls, signing_key: str | os.PathLike[str]) -> SpendRecord:
        """The record in the signing key's directory (empty if there is none yet)."""
        return cls.load(Path(signing_key).resolve().parent / SPEND_RECORD_NAME)

    @classmethod
    def load(cls, path: Path) -> SpendRecord:
        """The record at ``path``; :class:`ConfigError` if it exists but cannot be read (a
        coordinator must not forget what it acknowledged)."""
        if not path.exists():
            return cls(path, {})
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if doc.get("format") != SPEND_RECORD_FORMAT or not isinstance(doc["sites"], dict):
                raise ValueError(f"not a {SPEND_RECORD_FORMAT} document")
            receipts = {str(site_id): SignedReceipt.from_json(json.dumps(entry))
                        for site_id, entry in doc["sites"].items()}
            for site_id, signed in receipts.items():
                if signed.receipt.site_id != site_id:
                    raise ValueError(f"the receipt filed under {site_id!r} is another site's")
        except (OSError, ValueError, KeyError, TypeError, AttributeError,
                SignatureError) as exc:
            raise ConfigError(f"{path}: the coordinator's spend record is unreadable ({exc}); "
                              "restore it rather than delete it") from None
        return cls(path, receipts)

    def last(self, site_id: str) -> SpendReceipt | None:
        """The last receipt signed for ``site_id``, if any."""
        signed = self._receipts.get(site_id)
        return signed.receipt if signed is not None else None

    def rewind_reason(self, site_id: str, reported: float) -> str | None:
        """Why a site's reported cumulative spend cannot be accepted, or None."""
        last = self.last(site_id)
        if last is None or not spend_went_down(reported, last.rho_spent_total):
            return None
        return (f"the site reports a cumulative spend of rho={reported:.6g}, lower than the "
                f"rho={last.rho_spent_total:.6g} acknowledged by this coordinator's receipt "
                f"of run {last.run_id} ({last.issued_at}): its privacy ledger was deleted or "
                "rewound; restore the ledger (the site's receipts file lists what it spent)")

    def file(self, signed: SignedReceipt) -> None:
        """Keep ``signed`` as its site's last receipt (call :meth:`save` to persist)."""
        self._receipts[signed.receipt.site_id] = signed

    def save(self) -> None:
        """Replace the file atomically with the current record."""
        doc = {"format": SPEND_RECORD_FORMAT,
               "sites": {site_id: json.loads(signed.to_json())
                         for site_id, signed in sorted(self._receipts.items())}}
        atomic_write_text(self.path, json.dumps(doc, indent=2, sort_keys=True) + "\n")
