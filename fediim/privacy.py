"""Differential privacy for fediim: Gaussian releases under ρ-zCDP and a per-site ledger.

Privacy unit: one record at one site (add/remove neighbours, DESIGN §2 "Accounting"). A site
releases only noised statistics (Gram matrices, counts) through :func:`release_gaussian`,
which calibrates the Gaussian mechanism with OpenDP, charges the site's
:class:`PrivacyLedger` *before* any noise is drawn, and refuses a release that would pass
the site's ρ budget. Budgets compose sequentially (ρ's add) and are shown as (ε, δ) via
OpenDP's zCDP → approximate-DP conversion (tighter than ρ + 2√(ρ ln 1/δ)).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import opendp.prelude as dp

from fediim.atomic import atomic_write_text

dp.enable_features("contrib")

__all__ = [
    "LEDGER_FORMAT",
    "BudgetExceeded",
    "LedgerEntry",
    "LedgerError",
    "NoiseSource",
    "OpenDPGaussianNoise",
    "PrivacyLedger",
    "SeededGaussianNoise",
    "count_sensitivity",
    "epsilon_to_rho",
    "gaussian_sigma",
    "gram_sensitivity",
    "release_gaussian",
    "rho_to_epsilon",
]

LEDGER_FORMAT = "fediim-ledger/1"
_BUDGET_RTOL = 1e-12  # float slack when comparing spend against the budget
_MAP_RTOL = 1e-9  # allowed gap between OpenDP's privacy map and the requested ρ
_LEDGER_KEYS = frozenset({"format", "site_id", "rho_budget", "entries", "checksum"})


# --------------------------------------------------------------------------- validation


def _finite_float(name: str, value: float, *, minimum: float = 0.0, strict: bool = False) -> float:
    """``value`` as a float, checked finite and >= (or > if ``strict``) ``minimum``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number, not bool")
    v = float(value)
    if not math.isfinite(v) or v < minimum or (strict and v == minimum):
        op = ">" if strict else ">="
        raise ValueError(f"{name} must be finite and {op} {minimum}, got {value!r}")
    return v


def _check_delta(delta: float) -> float:
    d = float(delta)
    if not 0.0 < d < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta!r}")
    return d


# --------------------------------------------------------------------------- conversions


def _float_vector_space(size: int) -> tuple[Any, Any]:
    """OpenDP's metric space of float vectors of length ``size`` under the L2 distance."""
    return (
        dp.vector_domain(dp.atom_domain(T=float, nan=False), size=size),
        dp.l2_distance(T=float),
    )


@lru_cache(maxsize=128)
def _gaussian_measurement(size: int, sigma: float) -> dp.Measurement:
    """Gaussian mechanism (ρ-zCDP, exact sampler) on a float vector of length ``size``."""
    return _float_vector_space(size) >> dp.m.then_gaussian(scale=sigma)


@lru_cache(maxsize=1)
def _unit_zcdp_to_approx() -> dp.Measurement:
    """A scalar Gaussian (σ = 1, so map(d) = d²/2) converted to approximate DP."""
    meas = dp.m.make_gaussian(
        dp.atom_domain(T=float, nan=False), dp.absolute_distance(T=float), scale=1.0
    )
    return dp.c.make_zCDP_to_approxDP(meas)


def _classical_epsilon(rho: float, delta: float) -> float:
    """Bun & Steinke (2016, Prop. 1.3): ρ-zCDP ⇒ (ρ + 2√(ρ ln 1/δ), δ)-DP."""
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


def rho_to_epsilon(rho: float, delta: float) -> float:
    """ε such that ρ-zCDP implies (ε, δ)-DP, from OpenDP's ``make_zCDP_to_approxDP``.

    The conversion is driven through a unit Gaussian whose privacy map returns (at least) ρ,
    so the result is OpenDP's, never optimistic. For very large ρ (≳ 7·10⁴) OpenDP's
    numerics overflow and the classical bound ρ + 2√(ρ ln 1/δ) (valid, looser) is used.
    """
    r = float(rho)
    if math.isnan(r) or r < 0:
        raise ValueError(f"rho must be >= 0, got {rho!r}")
    d = _check_delta(delta)
    if r == 0.0:
        return 0.0
    if math.isinf(r):
        return math.inf
    # map(d_in) = d_in²/2 with upward rounding; nudging √(2ρ) up keeps the mapped ρ >= ρ.
    d_in = float(np.nextafter(math.sqrt(2.0 * r), math.inf))
    try:
        eps = float(_unit_zcdp_to_approx().map(d_in).epsilon(d))
    except dp.OpenDPException:
        return _classical_epsilon(r, d)
    return eps


def epsilon_to_rho(epsilon: float, delta: float) -> float:
    """Largest ρ whose (OpenDP) conversion gives ε' <= ``epsilon`` at ``delta``.

    Bisection on :func:`rho_to_epsilon` to a relative tolerance of 1e-9; the returned ρ
    always satisfies ``rho_to_epsilon(rho, delta) <= epsilon``. Use it to turn a site's
    (ε, δ) budget into the ρ budget its ledger accounts in.
    """
    e = float(epsilon)
    if math.isnan(e) or e < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
    d = _check_delta(delta)
    if math.isinf(e):
        return math.inf
    lo, hi = 0.0, max(1.0, e)
    while rho_to_epsilon(hi, d) <= e:
        lo, hi = hi, 2.0 * hi
        if not math.isfinite(hi):
            raise ValueError(f"epsilon={epsilon!r} is too large to invert")
    for _ in range(2000):  # ~35 iterations in practice; the cap only guards against hi -> 0
        if hi - lo <= 1e-9 * hi:
            break
        mid = 0.5 * (lo + hi)
        if rho_to_epsilon(mid, d) <= e:
            lo = mid
        else:
            hi = mid
    return lo


def gaussian_sigma(sensitivity_l2: float, rho: float) -> float:
    """Noise scale σ = Δ₂/√(2ρ) of the Gaussian mechanism that is exactly ρ-zCDP.

    (A Gaussian with scale σ on a query of L2 sensitivity Δ₂ is Δ₂²/(2σ²)-zCDP.)
    """
    delta2 = _finite_float("sensitivity_l2", sensitivity_l2)
    r = float(rho)
    if math.isnan(r) or r <= 0:
        raise ValueError(f"rho must be > 0, got {rho!r}")
    return delta2 / math.sqrt(2.0 * r)


# --------------------------------------------------------------------------- sensitivities


def gram_sensitivity(m: int) -> float:
    """L2 sensitivity of the released upper triangle of an augmented Gram matrix.

    Each record contributes z zᵀ with z = (1, t_1, …, t_m) and every t_j clamped to
    [−½, ½]; adding or removing one record changes G by ±z zᵀ. The release is the upper
    triangle of G (diagonal included), flattened, so the change has squared L2 norm
    ``sum_{i<=j} z_i² z_j² = ((sum z_i²)² + sum z_i⁴) / 2``, increasing in every |t_j|:
    its maximum, at the corners of the box, is ``((1 + m/4)² + 1 + m/16) / 2``. That is
    ~25% below the Frobenius bound ‖z zᵀ‖_F = ‖z‖² <= 1 + m/4 (DESIGN §2), which also
    counts each off-diagonal entry twice although it is released once (m = 5: 1.785 vs
    2.25; noise std scales with it). Callers must clamp before forming G.
    """
    if isinstance(m, bool) or not isinstance(m, int | np.integer) or m < 0:
        raise ValueError(f"m must be a non-negative int, got {m!r}")
    frob = 1.0 + int(m) / 4.0
    return math.sqrt((frob**2 + 1.0 + int(m) / 16.0) / 2.0)


def count_sensitivity() -> float:
    """L2 (= L1) sensitivity of a count: adding or removing one record changes it by 1."""
    return 1.0


# --------------------------------------------------------------------------- noise sources


@runtime_checkable
class NoiseSource(Protocol):
    """Draws i.i.d. N(0, σ²) noise; ``name`` is recorded in the ledger with each release."""

    name: str

    def sample(self, shape: tuple[int, ...], sigma: float) -> np.ndarray:
        """Noise array of the given shape."""
        ...


class OpenDPGaussianNoise:
    """OpenDP's exact Gaussian sampler — the source for real deployments (the default).

    Every call is ONE release of a whole vector through
    ``vector_domain(atom_domain(T=float, nan=False), size=N), l2_distance`` >>
    ``then_gaussian(scale=σ)`` (~3.7 ms per 36-vector, ~50 µs per value: never loop per
    element). :func:`release_gaussian` passes the actual values through :meth:`perturb`, so
    the released floats are exactly the output of the mechanism whose privacy map was
    checked (no separate float addition of noise to data).
    """

    name: str = "gaussian-opendp-exact"

    def measurement(self, size: int, sigma: float) -> dp.Measurement:
        """The OpenDP measurement used for a vector of length ``size`` at scale σ."""
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        return _gaussian_measurement(int(size), _finite_float("sigma", sigma, strict=True))

    def perturb(self, values: np.ndarray, sigma: float) -> np.ndarray:
        """Release ``values`` (finite floats, any shape) plus Gaussian noise, in one call."""
        arr = np.asarray(values, dtype=np.float64)
        if arr.size == 0:
            return arr.copy()
        if not np.all(np.isfinite(arr)):
            raise ValueError("values must be finite")  # OpenDP does not check its domain
        flat = arr.reshape(-1)
        out = np.asarray(self.measurement(flat.size, sigma)(flat.tolist()), dtype=np.float64)
        if out.shape != flat.shape:
            raise RuntimeError(f"OpenDP returned {out.shape}, expected {flat.shape}")
        return out.reshape(arr.shape)

    def sample(self, shape: tuple[int, ...], sigma: float) -> np.ndarray:
        """Pure noise of the given shape: one release of a zero vector."""
        return self.perturb(np.zeros(shape, dtype=np.float64), sigma)


class SeededGaussianNoise:
    """numpy Generator noise: reproducible simulations and tests only, never deployments.

    Floating-point Gaussian samplers are not exact (see Mironov 2012) and a known seed
    makes the noise public; the name written to the ledger says so.
    """

    name: str = "gaussian-numpy-seeded (simulation only, not for deployment)"

    def __init__(self, seed: int | np.random.SeedSequence | None = None) -> None:
        self._rng = np.random.default_rng(seed)

    def sample(self, shape: tuple[int, ...], sigma: float) -> np.ndarray:
        """Noise array of the given shape."""
        s = _finite_float("sigma", sigma, strict=True)
        return self._rng.normal(0.0, s, size=shape)


# --------------------------------------------------------------------------- ledger


class BudgetExceeded(RuntimeError):
    """A release would push a site's spent ρ past its budget; nothing was recorded or sent."""


class LedgerError(RuntimeError):
    """A ledger file is corrupt, tampered with, inconsistent, or belongs to another site."""


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

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)


def _entry_from_dict(raw: Any, index: int) -> LedgerEntry:
    """Validate one stored entry (raises ValueError describing the problem)."""
    fields = set(LedgerEntry.__dataclass_fields__)
    if not isinstance(raw, dict):
        raise ValueError(f"entry {index} is not an object")
    if set(raw) != fields:
        missing, extra = sorted(fields - set(raw)), sorted(set(raw) - fields)
        raise ValueError(f"entry {index} has missing keys {missing} / unknown keys {extra}")
    for key in ("mechanism", "purpose", "time", "noise_source"):
        if not isinstance(raw[key], str):
            raise ValueError(f"entry {index}: {key} must be a string")
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
    only over-report spend, never under-report it. Opening an existing file re-verifies it
    and never silently resets it.

    The checksum detects corruption and naive edits (e.g. lowering a ρ by hand); it does
    NOT stop a determined local adversary, who can recompute it — that would need a key
    the site does not hold (e.g. a coordinator-signed ledger). One process should own a
    ledger file; a concurrent writer is detected at the next charge (the file changed on
    disk) and raises :class:`LedgerError`.
    """

    def __init__(
        self,
        *,
        site_id: str,
        rho_budget: float,
        path: Path | None = None,
        entries: list[LedgerEntry] | None = None,
    ) -> None:
        """Prefer :meth:`open` (file-backed) or :meth:`in_memory` (simulations)."""
        if not isinstance(site_id, str) or not site_id:
            raise ValueError("site_id must be a non-empty string")
        self._site_id = site_id
        self._rho_budget = _finite_float("rho_budget", rho_budget, strict=True)
        self._path = path
        self._entries: list[LedgerEntry] = list(entries or [])
        self._disk_bytes: bytes | None = None  # what we last read or wrote

    # ---- construction

    @classmethod
    def in_memory(cls, rho_budget: float, site_id: str) -> PrivacyLedger:
        """A ledger that lives only in memory (simulations; nothing is persisted)."""
        return cls(site_id=site_id, rho_budget=rho_budget)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        rho_budget: float,
        site_id: str,
        *,
        must_exist: bool = False,
    ) -> PrivacyLedger:
        """Load and verify the ledger at ``path``, or create it (written at once) if absent.

        An existing file must hold this ``site_id`` and exactly this ``rho_budget``;
        otherwise :class:`LedgerError` (a budget is never silently reset or changed). The
        parent directory must exist (a mistyped directory must not create a fresh, empty
        ledger); pass ``must_exist=True`` to refuse creating a new file at all.
        """
        p = Path(path)
        ledger = cls(site_id=site_id, rho_budget=rho_budget, path=p)
        if p.exists():
            stored = cls._load(p)
            if stored._site_id != ledger._site_id:
                raise LedgerError(
                    f"ledger {p}: belongs to site {stored._site_id!r}, not {site_id!r}"
                )
            if stored._rho_budget != ledger._rho_budget:
                raise LedgerError(
                    f"ledger {p}: stored rho_budget {stored._rho_budget!r} differs from the "
                    f"configured {ledger._rho_budget!r}; refusing to change a budget silently"
                )
            return stored
        if must_exist:
            raise LedgerError(f"ledger {p} does not exist (must_exist=True)")
        if not p.parent.is_dir():
            raise LedgerError(f"ledger {p}: directory {p.parent} does not exist")
        ledger._persist(ledger._entries)
        return ledger

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
        ledger._disk_bytes = raw_bytes
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
        self._disk_bytes = text.encode("utf-8")

    def _check_disk_unchanged(self) -> None:
        """Refuse to charge if someone else rewrote (or removed) the file since we last did."""
        if self._path is None:
            return
        try:
            current = self._path.read_bytes()
        except OSError as exc:
            raise LedgerError(
                f"ledger {self._path}: cannot re-read before charging ({exc})"
            ) from exc
        if current != self._disk_bytes:
            raise LedgerError(
                f"ledger {self._path}: changed on disk since it was opened "
                "(another writer or an edit); re-open it"
            )

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

    def can_afford(self, rho: float) -> bool:
        """Whether charging ``rho`` more stays within the budget (1e-12 relative slack)."""
        r = _finite_float("rho", rho)
        return _within_budget(math.fsum([*(e.rho for e in self._entries), r]), self._rho_budget)

    def epsilon(self, delta: float) -> float:
        """ε of the spent ρ at ``delta`` (display only; accounting is in ρ)."""
        return rho_to_epsilon(self.spent_rho, delta)

    def summary(self, delta: float) -> dict[str, Any]:
        """Human/JSON-friendly status: spend and budget in ρ and in (ε, δ)."""
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
    ) -> LedgerEntry:
        """Record a release costing ``rho``; persisted before returning.

        Raises :class:`BudgetExceeded` (nothing recorded) if it would pass the budget, and
        :class:`LedgerError` if the file changed on disk behind this object's back.
        """
        r = _finite_float("rho", rho)
        entry = LedgerEntry(
            mechanism=str(mechanism),
            sensitivity_l2=_finite_float("sensitivity_l2", sensitivity_l2),
            sigma=_finite_float("sigma", sigma),
            rho=r,
            purpose=str(purpose),
            time=datetime.now(UTC).isoformat(timespec="microseconds"),
            dimension=int(dimension),
            noise_source=str(noise_source),
        )
        if entry.dimension < 0:
            raise ValueError(f"dimension must be >= 0, got {dimension!r}")
        if not self.can_afford(r):
            raise BudgetExceeded(
                f"site {self._site_id!r}: release {purpose!r} requests rho={r:.6g}, but "
                f"rho={self.spent_rho:.6g} of the budget {self._rho_budget:.6g} is already "
                f"spent (remaining {self.remaining_rho:.6g}); refused, nothing recorded"
            )
        self._check_disk_unchanged()
        new_entries = [*self._entries, entry]
        self._persist(new_entries)  # raises => in-memory state unchanged, nothing released
        self._entries = new_entries
        return entry

    def __repr__(self) -> str:
        where = "in-memory" if self._path is None else str(self._path)
        return (
            f"PrivacyLedger(site_id={self._site_id!r}, spent={self.spent_rho:.6g}, "
            f"budget={self._rho_budget:.6g}, {where})"
        )


# --------------------------------------------------------------------------- release


def release_gaussian(
    values: np.ndarray,
    *,
    sensitivity_l2: float,
    rho: float,
    ledger: PrivacyLedger,
    purpose: str,
    noise: NoiseSource | None = None,
    mechanism: str = "gaussian",
) -> np.ndarray:
    """Release ``values`` with the Gaussian mechanism at ρ-zCDP, charging ``ledger`` first.

    Mechanism: every value gets i.i.d. N(0, σ²) noise with σ = Δ₂/√(2ρ), where
    ``sensitivity_l2`` = Δ₂ bounds the L2 norm of the change of the whole flattened array
    when one record is added or removed (e.g. :func:`gram_sensitivity` for a Gram upper
    triangle). Such a release is ρ-zCDP; OpenDP's privacy map of the very measurement is
    checked to give <= ρ (1e-9 relative), and the ledger is charged that ρ (or OpenDP's
    value if a hair larger) BEFORE any noise is drawn: if the budget would be exceeded,
    :class:`BudgetExceeded` is raised and nothing is drawn or returned. The whole array is
    noised in one call and returned (float64) in its original shape. If drawing fails after
    the charge, the spend stays recorded (conservative).
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("values is empty: nothing to release")
    if not np.all(np.isfinite(arr)):
        raise ValueError("values must be finite (clamp and check before releasing)")
    delta2 = _finite_float("sensitivity_l2", sensitivity_l2, strict=True)
    r = _finite_float("rho", rho, strict=True)
    source: NoiseSource = OpenDPGaussianNoise() if noise is None else noise
    sigma = gaussian_sigma(delta2, r)
    n = int(arr.size)
    if isinstance(source, OpenDPGaussianNoise):
        meas = source.measurement(n, sigma)
    else:
        meas = _gaussian_measurement(n, sigma)
    mapped = float(meas.map(delta2))
    if mapped > r * (1.0 + _MAP_RTOL):
        raise RuntimeError(
            f"OpenDP privacy map gives rho={mapped!r} > requested {r!r} (sigma={sigma!r})"
        )
    ledger.charge(
        mechanism=mechanism,
        sensitivity_l2=delta2,
        sigma=sigma,
        rho=max(r, mapped),
        purpose=purpose,
        dimension=n,
        noise_source=source.name,
    )
    flat = arr.reshape(-1)
    if isinstance(source, OpenDPGaussianNoise):
        out = np.asarray(meas(flat.tolist()), dtype=np.float64)
    else:
        noise_vec = np.asarray(source.sample((n,), sigma), dtype=np.float64)
        if noise_vec.shape != (n,) or not np.all(np.isfinite(noise_vec)):
            raise RuntimeError(f"noise source {source.name!r} returned bad noise")
        out = flat + noise_vec
    if out.shape != (n,):
        raise RuntimeError(f"noise release returned shape {out.shape}, expected {(n,)}")
    return out.reshape(arr.shape)
