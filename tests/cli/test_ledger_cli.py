"""``fediim ledger init|show``: the ledger is created once, explicitly, and can be read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fediim.cli import main
from fediim.privacy import PrivacyLedger
from fediim.protocol.site_config import Budget, SiteConfig, site_config_toml


def _site_toml(tmp_path: Path) -> tuple[Path, SiteConfig]:
    cfg = SiteConfig(site_id="h1", data=tmp_path / "d.csv", schema=tmp_path / "s.toml",
                     ledger=tmp_path / "ledger.json", output_dir=tmp_path,
                     coordinator_public_key=tmp_path / "c.pub",
                     budget=Budget(epsilon=2.0, delta=1e-6))
    path = tmp_path / "site.toml"
    path.write_text(site_config_toml(cfg))
    return path, cfg


def test_init_creates_once_and_show_reads(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    toml, cfg = _site_toml(tmp_path)
    assert main(["ledger", "show", "--site-config", str(toml)]) == 2  # no ledger yet
    assert "does not exist" in capsys.readouterr().err
    assert main(["ledger", "init", "--site-config", str(toml)]) == 0
    assert main(["ledger", "init", "--site-config", str(toml)]) == 2  # never replaced
    assert "already exists" in capsys.readouterr().err
    PrivacyLedger.open(cfg.ledger, cfg.budget.rho, "h1").charge(
        mechanism="gaussian", sensitivity_l2=1.0, sigma=2.0, rho=0.0625, purpose="test",
        dimension=3, noise_source="opendp")
    assert main(["ledger", "show", "--site-config", str(toml), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["releases"] == 1 and shown["rho_spent"] == pytest.approx(0.0625)
    assert shown["entries"][0]["purpose"] == "test"
    assert main(["ledger", "show", "--site-config", str(toml)]) == 0
    assert "1 release(s)" in capsys.readouterr().out


def test_create_refuses_a_missing_directory(tmp_path: Path) -> None:
    from fediim.errors import LedgerError

    with pytest.raises(LedgerError, match="does not exist"):
        PrivacyLedger.create(tmp_path / "nope" / "l.json", 1.0, "s")


def test_show_prints_the_assumption_of_a_distributed_release(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    toml, cfg = _site_toml(tmp_path)
    assert main(["ledger", "init", "--site-config", str(toml)]) == 0
    ledger = PrivacyLedger.open(cfg.ledger, cfg.budget.rho, "h1")
    ledger.charge(mechanism="gaussian", sensitivity_l2=1.0, sigma=2.0, rho=0.01,
                  purpose="own noise", dimension=3, noise_source="opendp")
    ledger.charge(mechanism="distributed discrete gaussian", sensitivity_l2=9.0, sigma=4.0,
                  rho=0.02, purpose="gram", dimension=6, noise_source="opendp",
                  assumption="at least t=3 sites' noise in every released sum")
    capsys.readouterr()
    assert main(["ledger", "show", "--site-config", str(toml)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "assumes" not in lines[-2]
    assert lines[-1].endswith("gram  [assumes: at least t=3 sites' noise in every released sum]")
    assert main(["ledger", "show", "--site-config", str(toml), "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)["entries"]
    assert "assumption" not in entries[0]
    assert entries[1]["assumption"] == "at least t=3 sites' noise in every released sum"
