"""A site's imputation between runs, shared by ``fediim impute --site-config`` and
``fediim serve``: its configuration, its verified bank, its prepared engine and what it
has spent of its budget (read only: imputing never writes the ledger)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from fediim.errors import LedgerError
from fediim.federated.plan import Mode, unscale
from fediim.impute.encoding import MixedEncoding, schema_encoding
from fediim.io.outputs import apply_schema
from fediim.io.result import METHOD_FALLBACK, ImputationResult
from fediim.io.schema import TableSchema, load_schema
from fediim.io.table import format_level, read_csv
from fediim.privacy import PrivacyLedger, rho_to_epsilon
from fediim.protocol.signed_bank import SignedBank, load_signed_bank
from fediim.protocol.site_config import SiteConfig, load_site_config
from fediim.serve.draws import bank_draws, bank_residual_variance
from fediim.serve.engine import EngineSettings, ServingEngine

__all__ = ["BudgetView", "Site", "count_methods", "fallback_rate", "read_budget"]


@dataclass(frozen=True)
class Site:
    """A site's configuration, schema, verified bank and prepared engine."""

    config: SiteConfig
    schema: TableSchema
    signed: SignedBank
    engine: ServingEngine
    #: The coded columns' encoding (None: every column numeric); the engine works on the
    #: encoded columns, everything else here on the schema's.
    encoding: MixedEncoding | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, mode: Mode | None = None,
             n_neighbors: int | None = None) -> Site:
        """Read the site TOML at ``path``, verify its bank (signature before a byte of it
        is parsed; age) and prepare the engine on the site's own rows (its ``data``).

        Any problem is a :class:`~fediim.errors.FediimError` naming the file."""
        config = load_site_config(path)
        schema = load_schema(config.schema_path)
        signed = load_signed_bank(config.bank_path, config.bank_signature_path,
                                  config.coordinator_public_key, schema.schema_hash(),
                                  max_age_days=config.max_bank_age_days)
        # A column this hospital never measures is what the federation's bank is for.
        reference = read_csv(config.data, schema=schema, allow_empty_columns=True)
        settings = EngineSettings(mode=mode or config.serve.mode,
                                  n_neighbors=n_neighbors or config.serve.n_neighbors,
                                  site_id=config.site_id)
        # Coded columns as the federation released them (one-hot, public coordinates).
        encoding = schema_encoding(schema)
        bounds = schema.bounds_array()
        if encoding is None:
            engine = ServingEngine(reference.values, signed.bank, bounds, settings)
        else:
            engine = ServingEngine(encoding.encode(reference.values), signed.bank,
                                   encoding.encoded_bounds(bounds), settings)
        return cls(config=config, schema=schema, signed=signed, engine=engine,
                   encoding=encoding)

    @property
    def columns(self) -> list[str]:
        """The schema's column names, in order."""
        return self.schema.column_names

    def impute(self, x: np.ndarray) -> ImputationResult:
        """The rows of ``x`` (schema columns, NaN missing) imputed, the schema applied
        (columns with ``impute = false`` keep their gaps; values within bounds)."""
        if self.encoding is None:
            result = self.engine.impute(x)
        else:  # declared levels, with their probabilities
            x = np.asarray(x, dtype=np.float64)
            result = self.encoding.decode(self.engine.impute(self.encoding.encode(x)), x)
        apply_schema(result, self.schema, self.columns)
        return result

    def impute_multiple(self, x: np.ndarray, n_imputations: int, rng: np.random.Generator,
                        variance: np.ndarray | None = None) -> list[ImputationResult]:
        """``n_imputations`` draws of the rows of ``x`` completed from the bank (see
        :mod:`fediim.serve.draws`), the schema applied to each; ``variance`` as
        :meth:`draw_variance` measured it (else it is measured here)."""
        draws = bank_draws(self.engine.reference, np.asarray(x, dtype=np.float64),
                           self.signed.bank, self.engine.bounds, self.engine.settings,
                           n_imputations, rng, self.encoding, variance)
        for result in draws:
            apply_schema(result, self.schema, self.columns)
        return draws

    def draw_variance(self, rng: np.random.Generator) -> np.ndarray | None:
        """The residual variance the draws add, per engine column, measured on the
        site's own rows (None in ``local`` mode, whose draws are IIM's own)."""
        if self.engine.settings.mode == "local":
            return None
        return bank_residual_variance(self.engine.reference, self.signed.bank,
                                      self.engine.bounds, self.engine.settings, rng,
                                      self.encoding)

    @property
    def engine_columns(self) -> np.ndarray:
        """Per schema column, its (first) column in the engine's encoded columns."""
        if self.encoding is None:
            return np.arange(len(self.columns))
        return np.array([int(block[0]) for block in self.encoding.blocks])

    def baseline_rmse(self) -> np.ndarray:
        """Per schema column, the cross-fitted RMSE of its plan from every other column
        (raw units; NaN where unknown and for a coded column, whose error is a level)."""
        span = self.engine.bounds[:, 1] - self.engine.bounds[:, 0]
        numeric = [spec.levels is None for spec in self.schema.columns]
        return np.array([
            np.nan if not is_numeric or (rmse := self.engine.baseline_rmse(int(c))) is None
            else rmse * span[c]
            for c, is_numeric in zip(self.engine_columns, numeric, strict=True)])

    def bank_moments(self) -> tuple[np.ndarray, np.ndarray]:
        """The bank's mean and standard deviation per column, raw units."""
        bounds = self.engine.bounds
        mean, variance = self.signed.bank.column_moments()
        columns = np.arange(len(mean))
        return (unscale(mean, bounds, columns),
                np.sqrt(np.maximum(variance, 0.0)) * (bounds[:, 1] - bounds[:, 0]))

    def drift_reference(self) -> tuple[np.ndarray, np.ndarray]:
        """Per engine (encoded) column, the mean drift is measured from and the spread it
        is measured in (raw units; a categorical column's level indicators each give a
        level's frequency and its spread): the site's own rows where it measures the
        column (exact: they never left; they are what the local side and every choice were
        fitted on), else the bank's moments. The bank's moments carry the noise of its
        released sums (at eps = 4 a mean can sit half a standard deviation off and a
        variance be several times the data's): as a yardstick they would flag drift on the
        bank's own rows."""
        site, span = self.engine.site, self.engine.bounds[:, 1] - self.engine.bounds[:, 0]
        lo = self.engine.bounds[:, 0]
        with np.errstate(invalid="ignore"):
            counts = (~site.missing).sum(axis=0)
        bank_mean, bank_sd = self.bank_moments()
        own_mean = (site.center + 0.5) * span + lo
        own_sd = np.where(counts >= 2, site.scale * span, np.nan)
        measured = (counts >= 2) & (own_sd > 0)
        return np.where(measured, own_mean, bank_mean), np.where(measured, own_sd, bank_sd)

    def drift_blocks(self) -> list[list[int]]:
        """Per schema column, the engine columns drift watches it by (a categorical
        column's level indicators; one column for any other)."""
        if self.encoding is None:
            return [[column] for column in range(len(self.columns))]
        return [[int(c) for c in block] for block in self.encoding.blocks]

    def level_names(self) -> list[list[str] | None]:
        """Per schema column, a categorical column's levels as text (None for others)."""
        return [[format_level(level) for level in spec.levels]
                if spec.kind == "categorical" and spec.levels is not None else None
                for spec in self.schema.columns]

    def engine_rows(self, x: np.ndarray) -> np.ndarray:
        """Rows of schema columns (codes for coded ones) in the engine's columns."""
        return x if self.encoding is None else self.encoding.encode(x)

    def bank_age_days(self, now: datetime) -> float:
        """Days since the bank was stored."""
        return (now - self.signed.saved_at).total_seconds() / 86400.0

    def bank_is_stale(self, now: datetime) -> bool:
        """Whether the bank is older than the site allows (``max_bank_age_days``)."""
        return self.bank_age_days(now) > self.config.max_bank_age_days


def count_methods(result: ImputationResult) -> dict[str, int]:
    """Imputed cells per method."""
    methods, counts = np.unique(result.method[result.imputed].astype(str), return_counts=True)
    return {str(m): int(c) for m, c in zip(methods, counts, strict=True)}


def fallback_rate(counts: dict[str, int]) -> float:
    """Share of the imputed cells that got the fallback (0 when none was imputed)."""
    total = sum(counts.values())
    return counts.get(METHOD_FALLBACK, 0) / total if total else 0.0


@dataclass(frozen=True)
class BudgetView:
    """The site's privacy budget as its ledger states it (read only), or why not."""

    summary: dict[str, Any] | None
    history: list[dict[str, Any]]
    error: str | None = None


def read_budget(config: SiteConfig) -> BudgetView:
    """The site's spend, remaining budget and release history from its ledger; a ledger
    that cannot be read is reported, not raised (the service keeps imputing)."""
    delta = config.budget.delta
    try:
        ledger = PrivacyLedger.open(config.ledger, config.budget.rho, config.site_id)
    except LedgerError as exc:
        return BudgetView(summary=None, history=[], error=str(exc))
    summary = ledger.summary(delta)
    summary["epsilon_remaining"] = summary["epsilon_budget"] - summary["epsilon_spent"]
    history, spent = [], 0.0
    for entry in ledger.entries:
        spent += entry.rho
        history.append({"time": entry.time, "purpose": entry.purpose, "rho": entry.rho,
                        "epsilon_spent_after": rho_to_epsilon(spent, delta)})
    return BudgetView(summary=summary, history=history)
