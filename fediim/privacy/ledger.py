"""The site's ρ-zCDP privacy ledger: every release recorded before it is sent, on disk.

A :class:`PrivacyLedger` is the site's own record of what it released (mechanism,
sensitivity, σ, ρ, purpose, time), persisted atomically with a checksum; a charge that
would pass the site's budget is refused and nothing is recorded.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fediim.errors import BudgetExceeded, LedgerError
from fediim.io.atomic import atomic_write_text
from fediim.privacy.mechanisms import OpenDPGaussianNoise, finite_float, rho_to_epsilon

__all__ = ["LEDGER_FORMAT", "BudgetExceeded", "LedgerEntry", "LedgerError", "PrivacyLedger"]

LEDGER_FORMAT = "fediim-ledger/1"
_BUDGET_RTOL = 1e-12  # float slack when comparing spend against the budget
_LEDGER_KEYS = frozenset({"format", "site_id", "rho_budget", "entries", "checksum"})
_OPTIONAL_ENTRY_KEYS = frozenset({"assumption"})  # absent from ledgers written before it



@dataclass(frozen=True)
class LedgerEntry:
    """One charged release: what was released, how noisy, and what it cost in ρ."""

    mechanism: str
    sensitivity_l2: float
    sigma: float
    rho: float
    purpose: str
    time: str  # ISO-8601, UTC
    dimension: int  # number of noised values
    noise_source: str
    # the trust the release's guarantee rests on (e.g. a secure sum's "at least t sites'
    # noise in every released sum"); None: the site's own noise alone, no assumption
    assumption: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (``assumption`` only when there is one, so entries without
        it keep the exact layout of ledgers written before the field existed)."""
        out = asdict(self)
        if self.assumption is None:
            del out["assumption"]
        return out

    @property
    def insecure_noise(self) -> bool:
        """Whether the noise came from anything but OpenDP's exact sampler (e.g. seeded
        simulation noise, which whoever knows the seed can subtract): the recorded ρ then
        states what the release would cost with private noise, not a guarantee."""
        return self.noise_source != OpenDPGaussianNoise.name


def _entry_from_dict(raw: Any, index: int) -> LedgerEntry:
    """Validate one stored entry (raises ValueError describing the problem)."""
    fields = set(LedgerEntry.__dataclass_fields__)
    if not isinstance(raw, dict):
        raise ValueError(f"entry {index} is not an object")
    if not fields - _OPTIONAL_ENTRY_KEYS <= set(raw) <= fields:
        missing = sorted(fields - _OPTIONAL_ENTRY_KEYS - set(raw))
        extra = sorted(set(raw) - fields)
        raise ValueError(f"entry {index} has missing keys {missing} / unknown keys {extra}")
    for key in ("mechanism", "purpose", "time", "noise_source"):
        if not isinstance(raw[key], str):
            raise ValueError(f"entry {index}: {key} must be a string")
    assumption = raw.get("assumption")
    if assumption is not None and not isinstance(assumption, str):
        raise ValueError(f"entry {index}: assumption must be a string or absent")
    for key in ("sensitivity_l2", "sigma", "rho"):
        v = raw[key]
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"entry {index}: {key} must be a number")
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"entry {index}: {key} = {v!r} is negative or non-finite")
    dim = raw["dimension"]
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
        raise ValueError(f"entry {index}: dimension must be a non-negative int")
    try:
        datetime.fromisoformat(raw["time"])
    except ValueError:
        raise ValueError(f"entry {index}: time {raw['time']!r} is not ISO-8601") from None
    return LedgerEntry(
        mechanism=raw["mechanism"],
        sensitivity_l2=float(raw["sensitivity_l2"]),
        sigma=float(raw["sigma"]),
        rho=float(raw["rho"]),
        purpose=raw["purpose"],
        time=raw["time"],
        dimension=dim,
        noise_source=raw["noise_source"],
        assumption=assumption,
    )


def _canonical_json(obj: Any) -> bytes:
    """Canonical JSON bytes (sorted keys, no whitespace, UTF-8, no NaN/Infinity)."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _checksum(payload: dict[str, Any]) -> str:
    """sha256 hex digest of the canonical JSON of the ledger minus its checksum."""
    return hashlib.sha256(_canonical_json(payload)).hexdigest()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} in JSON")


def _within_budget(total: float, budget: float) -> bool:
    return total <= budget * (1.0 + _BUDGET_RTOL)


class PrivacyLedger:
    """Per-site ρ-zCDP accountant under sequential composition, persisted as JSON.

    File layout: ``{"format": "fediim-ledger/1", "site_id", "rho_budget", "entries": [...],
    "checksum"}`` where ``checksum`` is the sha256 of the canonical JSON (sorted keys, no
    whitespace) of everything else. Every charge is written atomically (temp file, flush,
    fsync, ``os.replace``) *before* :meth:`charge` returns, so a crash after a charge can
    only over-report spend, never under-report it. A ledger file is created once with
    :meth:`create`; :meth:`open` re-verifies it, refuses a missing one and never silently
    resets it.

    The checksum detects corruption and naive edits (e.g. lowering a ρ by hand); it does
    NOT stop a determined local adversary, who can recompute it — that would need a key
    the site does not hold (e.g. a coordinator-signed ledger). Several processes may charge
    one file: each charge holds an exclusive lock across read–check–write.
    """

    def __init__(
        self,
        *,
        site_id: str,
        rho_budget: float,
        path: Path | None = None,
        entries: list[LedgerEntry] | None = None,
    ) -> None:
        """Prefer :meth:`create` / :meth:`open` (file-backed) or :meth:`in_memory`
        (simulations)."""
        if not isinstance(site_id, str) or not site_id:
            raise ValueError("site_id must be a non-empty string")
        self._site_id = site_id
        self._rho_budget = finite_float("rho_budget", rho_budget, strict=True)
        self._path = path
        self._entries: list[LedgerEntry] = list(entries or [])

    # ---- construction

    @classmethod
    def in_memory(cls, rho_budget: float, site_id: str) -> PrivacyLedger:
        """A ledger that lives only in memory (simulations; nothing is persisted)."""
        return cls(site_id=site_id, rho_budget=rho_budget)

    @classmethod
    def create(cls, path: str | os.PathLike[str], rho_budget: float,
               site_id: str) -> PrivacyLedger:
        """Create the site's ledger at ``path`` (an explicit, one-time act).

        Refuses if a file is already there (a ledger is never replaced) or if the directory
        does not exist (a mistyped path must not start a fresh budget elsewhere).
        """
        p = Path(path)
        if p.exists():
            raise LedgerError(f"ledger {p} already exists; a ledger is never replaced")
        if not p.parent.is_dir():
            raise LedgerError(f"ledger {p}: directory {p.parent} does not exist")
        ledger = cls(site_id=site_id, rho_budget=rho_budget, path=p)
        with ledger._locked():
            if p.exists():  # created by another process since the check above
                raise LedgerError(f"ledger {p} already exists; a ledger is never replaced")
            ledger._persist([])
        return ledger

    @classmethod
    def open(cls, path: str | os.PathLike[str], rho_budget: float,
             site_id: str) -> PrivacyLedger:
        """Load and verify the existing ledger at ``path``; never create one.

        The file must hold this ``site_id`` and exactly this ``rho_budget``; otherwise
        :class:`LedgerError` (a budget is never silently reset or changed). A missing file
        is a :class:`LedgerError` too: a deleted or misplaced ledger must never become a
        fresh budget. Ledgers are created once, explicitly, with :meth:`create`
        (``fediim ledger init``).
        """
        p = Path(path)
        if not p.exists():
            raise LedgerError(f"ledger {p} does not exist; a ledger is created once, "
                              "explicitly (fediim ledger init), never when it is missing")
        stored = cls._load(p)
        if stored._site_id != site_id:
            raise LedgerError(f"ledger {p}: belongs to site {stored._site_id!r}, not {site_id!r}")
        budget = finite_float("rho_budget", rho_budget, strict=True)
        if stored._rho_budget != budget:
            raise LedgerError(
                f"ledger {p}: stored rho_budget {stored._rho_budget!r} differs from the "
                f"configured {budget!r}; refusing to change a budget silently"
            )
        return stored

    @classmethod
    def _load(cls, path: Path) -> PrivacyLedger:
        """Read and fully verify a ledger file (LedgerError naming file and problem)."""
        try:
            raw_bytes = path.read_bytes()
        except OSError as exc:
            raise LedgerError(f"ledger {path}: cannot read ({exc})") from exc
        try:
            doc = json.loads(raw_bytes.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError) as exc:
            raise LedgerError(f"ledger {path}: not valid JSON ({exc})") from exc
        if not isinstance(doc, dict):
            raise LedgerError(f"ledger {path}: top level is not a JSON object")
        missing = sorted(_LEDGER_KEYS - set(doc))
        extra = sorted(set(doc) - _LEDGER_KEYS)
        if missing or extra:
            raise LedgerError(f"ledger {path}: missing keys {missing} / unknown keys {extra}")
        if doc["format"] != LEDGER_FORMAT:
            raise LedgerError(f"ledger {path}: format {doc['format']!r} is not {LEDGER_FORMAT!r}")
        payload = {k: v for k, v in doc.items() if k != "checksum"}
        stored_sum = doc["checksum"]
        if not isinstance(stored_sum, str) or not hmac.compare_digest(
            stored_sum, _checksum(payload)
        ):
            raise LedgerError(
                f"ledger {path}: checksum mismatch (file corrupted or edited by hand)"
            )
        site_id, budget, raw_entries = doc["site_id"], doc["rho_budget"], doc["entries"]
        if not isinstance(site_id, str) or not site_id:
            raise LedgerError(f"ledger {path}: site_id must be a non-empty string")
        if (
            isinstance(budget, bool)
            or not isinstance(budget, int | float)
            or not math.isfinite(budget)
            or budget <= 0
        ):
            raise LedgerError(f"ledger {path}: rho_budget {budget!r} must be finite and > 0")
        if not isinstance(raw_entries, list):
            raise LedgerError(f"ledger {path}: entries must be a list")
        try:
            entries = [_entry_from_dict(e, i) for i, e in enumerate(raw_entries)]
        except ValueError as exc:
            raise LedgerError(f"ledger {path}: {exc}") from exc
        spent = math.fsum(e.rho for e in entries)
        if not _within_budget(spent, float(budget)):
            raise LedgerError(
                f"ledger {path}: entries spend rho={spent!r}, more than the budget {budget!r}"
            )
        ledger = cls(site_id=site_id, rho_budget=float(budget), path=path, entries=entries)
        return ledger

    # ---- persistence

    def _document(self, entries: list[LedgerEntry]) -> str:
        payload: dict[str, Any] = {
            "format": LEDGER_FORMAT,
            "site_id": self._site_id,
            "rho_budget": self._rho_budget,
            "entries": [e.to_dict() for e in entries],
        }
        doc = {**payload, "checksum": _checksum(payload)}
        return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"

    def _persist(self, entries: list[LedgerEntry]) -> None:
        """Atomically write ``entries`` (no-op for in-memory ledgers)."""
        if self._path is None:
            return
        text = self._document(entries)
        atomic_write_text(self._path, text)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold an exclusive lock across read–check–write: every process that charges the
        same file serialises here, so no charge is lost and the budget holds across them.

        The lock is on the ledger's directory (the file itself is replaced atomically at
        every charge, so a lock on it would not outlive the charge). In-memory ledgers need
        no lock.
        """
        if self._path is None:
            yield
            return
        fd = os.open(self._path.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _sync_from_disk(self) -> None:
        """Adopt what other writers charged since we last read; refuse a rewound file.

        The file on disk must still verify and must extend the entries this object has
        seen: a deleted, replaced or shortened ledger is a :class:`LedgerError`, never a
        fresh budget.
        """
        if self._path is None:
            return
        if not self._path.exists():
            raise LedgerError(f"ledger {self._path}: the file is gone; refusing to charge "
                              "(a ledger is never recreated silently)")
        stored = self._load(self._path)
        if (stored._site_id, stored._rho_budget) != (self._site_id, self._rho_budget):
            raise LedgerError(f"ledger {self._path}: changed on disk to another site or budget")
        if list(stored._entries[: len(self._entries)]) != self._entries:
            raise LedgerError(f"ledger {self._path}: changed on disk: entries this process "
                              "saw are gone or altered (a rewound or replaced ledger)")
        self._entries = list(stored._entries)

    # ---- queries

    @property
    def site_id(self) -> str:
        """The site this ledger accounts for."""
        return self._site_id

    @property
    def rho_budget(self) -> float:
        """Total ρ the site may spend."""
        return self._rho_budget

    @property
    def path(self) -> Path | None:
        """Backing file, or None for an in-memory ledger."""
        return self._path

    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        """All charged releases, oldest first."""
        return tuple(self._entries)

    @property
    def spent_rho(self) -> float:
        """ρ spent so far (sequential composition: the sum of the entries' ρ)."""
        return math.fsum(e.rho for e in self._entries)

    @property
    def remaining_rho(self) -> float:
        """ρ still available (never negative)."""
        return max(0.0, self._rho_budget - self.spent_rho)

    @property
    def insecure_noise(self) -> bool:
        """Whether any release was noised insecurely (see :attr:`LedgerEntry.insecure_noise`):
        the spend shown is then nominal, not a privacy guarantee."""
        return any(entry.insecure_noise for entry in self._entries)

    def can_afford(self, rho: float) -> bool:
        """Whether charging ``rho`` more stays within the budget (1e-12 relative slack)."""
        r = finite_float("rho", rho)
        return _within_budget(math.fsum([*(e.rho for e in self._entries), r]), self._rho_budget)

    def epsilon(self, delta: float) -> float:
        """ε of the spent ρ at ``delta`` (display only; accounting is in ρ)."""
        return rho_to_epsilon(self.spent_rho, delta)

    def summary(self, delta: float) -> dict[str, Any]:
        """Human/JSON-friendly status: spend and budget in ρ and in (ε, δ), and whether any
        release used insecure (seeded) noise."""
        return {
            "site_id": self._site_id,
            "path": None if self._path is None else str(self._path),
            "releases": len(self._entries),
            "rho_budget": self._rho_budget,
            "rho_spent": self.spent_rho,
            "rho_remaining": self.remaining_rho,
            "delta": float(delta),
            "epsilon_spent": self.epsilon(delta),
            "epsilon_budget": rho_to_epsilon(self._rho_budget, delta),
            "insecure_noise": self.insecure_noise,
        }

    # ---- charging

    def charge(
        self,
        mechanism: str,
        sensitivity_l2: float,
        sigma: float,
        rho: float,
        purpose: str,
        dimension: int,
        noise_source: str,
        *,
        assumption: str | None = None,
    ) -> LedgerEntry:
        """Record a release costing ``rho``; persisted before returning.

        ``assumption`` states what the guarantee rests on beyond the site's own noise (a
        distributed release: other sites' noise in the sum), kept in the entry.

        Holds the ledger's exclusive lock from reading the file to writing it, so charges
        from several processes all land and together never pass the budget. Raises
        :class:`BudgetExceeded` (nothing recorded) if it would pass the budget, and
        :class:`LedgerError` if the file was deleted, rewound or replaced.
        """
        r = finite_float("rho", rho)
        entry = LedgerEntry(
            mechanism=str(mechanism),
            sensitivity_l2=finite_float("sensitivity_l2", sensitivity_l2),
            sigma=finite_float("sigma", sigma),
            rho=r,
            purpose=str(purpose),
            time=datetime.now(UTC).isoformat(timespec="microseconds"),
            dimension=int(dimension),
            noise_source=str(noise_source),
            assumption=None if assumption is None else str(assumption),
        )
        if entry.dimension < 0:
            raise ValueError(f"dimension must be >= 0, got {dimension!r}")
        with self._locked():
            self._sync_from_disk()
            if not self.can_afford(r):
                raise BudgetExceeded(
                    f"site {self._site_id!r}: release {purpose!r} requests rho={r:.6g}, but "
                    f"rho={self.spent_rho:.6g} of the budget {self._rho_budget:.6g} is "
                    f"already spent (remaining {self.remaining_rho:.6g}); refused, nothing "
                    "recorded")
            new_entries = [*self._entries, entry]
            self._persist(new_entries)  # raises => state unchanged, nothing released
            self._entries = new_entries
        return entry

    def __repr__(self) -> str:
        where = "in-memory" if self._path is None else str(self._path)
        return (
            f"PrivacyLedger(site_id={self._site_id!r}, spent={self.spent_rho:.6g}, "
            f"budget={self._rho_budget:.6g}, {where})"
        )
