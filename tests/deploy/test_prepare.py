"""``prepare_federation``: it creates every site's privacy ledger explicitly, keeps it across
runs into the same directory, refuses one of another budget or site before writing, and
makes a new output directory private."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from fediim.deploy.layout import FederationLayout, prepare_federation
from fediim.errors import LedgerError
from fediim.io.schema import TableSchema
from fediim.privacy import PrivacyLedger
from fediim.protocol.site_config import load_site_config


def _prepare(tmp_path: Path, **kwargs: float) -> FederationLayout:
    schema = tmp_path / "schema.toml"
    schema.write_text(TableSchema.model_validate(
        {"columns": [{"name": "x", "bounds": (0.0, 1.0)}]}).to_toml())
    data = [tmp_path / "a.csv", tmp_path / "b.csv"]
    return prepare_federation(data, schema, tmp_path / "out", **kwargs)


def test_prepare_federation_creates_each_sites_ledger(tmp_path: Path) -> None:
    """Sites no longer create a missing ledger (``PrivacyLedger.open`` refuses), so the
    deployment must: each site's ledger exists, empty, with the budget of its TOML."""
    layout = _prepare(tmp_path, epsilon=2.0, budget_epsilon=6.0)
    for site in layout.sites:
        budget = load_site_config(site.config).budget
        assert site.ledger.is_file()
        ledger = PrivacyLedger.open(site.ledger, budget.rho, site.site_id)
        assert ledger.entries == () and ledger.rho_budget == budget.rho


def test_prepare_federation_keeps_a_ledger_and_refuses_another_budget(tmp_path: Path) -> None:
    """A re-run into the same directory keeps the spend; one with another budget is refused
    before any file changes (it used to rewrite the TOMLs, and each site then refused the
    run)."""
    layout = _prepare(tmp_path, epsilon=2.0)
    site = layout.sites[0]
    budget = load_site_config(site.config).budget
    PrivacyLedger.open(site.ledger, budget.rho, site.site_id).charge(
        "gaussian", sensitivity_l2=1.0, sigma=1.0, rho=budget.rho / 4, purpose="test",
        dimension=1, noise_source="test")
    spent = site.ledger.read_bytes()
    _prepare(tmp_path, epsilon=2.0)
    assert site.ledger.read_bytes() == spent
    tomls = [s.config.read_bytes() for s in layout.sites]
    with pytest.raises(LedgerError, match="differs from the configured.*new --out"):
        _prepare(tmp_path, epsilon=2.0, budget_epsilon=3.0)
    assert site.ledger.read_bytes() == spent
    assert [s.config.read_bytes() for s in layout.sites] == tomls


def test_prepare_federation_refuses_a_ledger_of_another_site(tmp_path: Path) -> None:
    layout = _prepare(tmp_path)
    first, second = layout.sites
    second.ledger.unlink()
    second.ledger.write_bytes(first.ledger.read_bytes())
    with pytest.raises(LedgerError, match="belongs to site 'a', not 'b'"):
        _prepare(tmp_path)


def test_a_new_output_directory_is_private(tmp_path: Path) -> None:
    """OUT holds every site's records, outputs and logs: a new one is created 0700 (the
    umask would leave it world-readable); an existing directory keeps its mode."""
    layout = _prepare(tmp_path)
    assert stat.S_IMODE(layout.out.stat().st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    schema = tmp_path / "schema.toml"
    prepare_federation([tmp_path / "a.csv"], schema, shared)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755
