"""``fediim impute --site-config``: a site imputes new rows every day from the signed bank of
its last federation run, spends no budget, and refuses a bank it cannot trust."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fediim.cli import main
from fediim.errors import BankError, ExitCode, SignatureError
from fediim.federated.bank import ModelBank
from fediim.io.schema import load_schema
from fediim.io.table import read_csv
from fediim.protocol.signed_bank import load_signed_bank
from fediim.protocol.signing import (
    key_id,
    load_public_key,
    read_signature_file,
    write_keypair,
)
from fediim.protocol.site_config import SiteConfig, load_site_config, site_config_toml
from tests.apps.test_flower_apps import RUN_ID, _federation, _run, _schema, _table, _write_csv


@pytest.fixture(scope="module")
def site_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The TOML of a site whose output_dir holds the bank of a real (in-process) run."""
    layout = _federation(tmp_path_factory.mktemp("federation"))
    _run(layout)
    return layout.sites[0].config


def _new_rows(tmp_path: Path) -> Path:
    path = tmp_path / "today.csv"
    _write_csv(path, _table(17, 60))
    return path


def _impute(tmp_path: Path, config: Path, *extra: str) -> int:
    return main(["impute", str(_new_rows(tmp_path)), "-o", str(tmp_path / "out.csv"),
                 "--site-config", str(config), *extra])


def _outputs(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "out.csv", tmp_path / "out.flags.csv",
                        tmp_path / "out.audit.jsonl") if p.exists()]


def _site_copy(site_config: Path, tmp_path: Path) -> tuple[Path, SiteConfig]:
    """A TOML for the same site reading copies of its bank, signature, pinned key and
    schema (through the optional keys ``bank`` and ``bank_signature``), so that a test
    may spoil them."""
    cfg = load_site_config(site_config)
    copies = tmp_path / "copies"
    copies.mkdir()
    sources = {"bank": cfg.bank_path, "bank_signature": cfg.bank_signature_path,
               "coordinator_public_key": cfg.coordinator_public_key,
               "schema_path": cfg.schema_path}
    update = {key: Path(shutil.copy2(src, copies / src.name)) for key, src in sources.items()}
    copy = cfg.model_copy(update={**update, "output_dir": tmp_path / "site-out"})
    path = tmp_path / "site.toml"
    path.write_text(site_config_toml(copy), encoding="utf-8")
    return path, load_site_config(path)


@pytest.mark.parametrize("mode", [None, "federated"])
def test_imputes_new_rows_from_the_bank_without_touching_the_ledger(
        site_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        mode: str | None) -> None:
    cfg = load_site_config(site_config)
    ledger_before = cfg.ledger.read_bytes()
    extra = ["--mode", mode] if mode else []
    assert _impute(tmp_path, site_config, *extra) == ExitCode.OK
    assert cfg.ledger.read_bytes() == ledger_before  # no budget spent, no entry written
    assert f"from the bank of run {RUN_ID}" in capsys.readouterr().err
    src, out = read_csv(tmp_path / "today.csv"), read_csv(tmp_path / "out.csv")
    observed = ~np.isnan(src.values)
    assert out.columns == src.columns and not np.isnan(out.values).any()
    np.testing.assert_array_equal(out.values[observed], src.values[observed])
    audit = (tmp_path / "out.audit.jsonl").read_text().splitlines()
    assert len(audit) == int((~observed).sum()) > 0
    assert len((tmp_path / "out.flags.csv").read_text().splitlines()) == src.n_rows + 1


@pytest.mark.parametrize("mode", ["hybrid", "local"])
def test_multiple_draws_from_the_bank_without_touching_the_ledger(
        site_config: Path, tmp_path: Path, mode: str) -> None:
    cfg = load_site_config(site_config)
    ledger_before = cfg.ledger.read_bytes()
    assert _impute(tmp_path, site_config, "--mode", mode, "--multiple", "3",
                   "--seed", "4") == ExitCode.OK
    assert cfg.ledger.read_bytes() == ledger_before
    src = read_csv(tmp_path / "today.csv")
    observed = ~np.isnan(src.values)
    bounds = load_schema(cfg.schema_path).bounds_array()
    drawn = [read_csv(tmp_path / f"out.imp{n}.csv").values for n in (1, 2, 3)]
    for values in drawn:
        np.testing.assert_array_equal(values[observed], src.values[observed])
        assert not np.isnan(values).any()
        assert np.all((values >= bounds[:, 0]) & (values <= bounds[:, 1]))
    assert not np.array_equal(drawn[0][~observed], drawn[1][~observed])
    first = (tmp_path / "out.imp3.csv").read_bytes()
    assert _impute(tmp_path, site_config, "--mode", mode, "--multiple", "3",
                   "--seed", "4") == ExitCode.OK
    assert (tmp_path / "out.imp3.csv").read_bytes() == first  # the seed fixes the draws


def _flip_bank_byte(cfg: SiteConfig, tmp_path: Path) -> None:
    data = bytearray(cfg.bank_path.read_bytes())
    data[len(data) // 2] ^= 0x01
    cfg.bank_path.write_bytes(bytes(data))


def _change_signed_run(cfg: SiteConfig, tmp_path: Path) -> None:
    path = cfg.bank_signature_path
    text = path.read_text()
    path.write_text(text.replace(f'"run_id": {RUN_ID}', f'"run_id": {RUN_ID + 1}'))
    assert path.read_text() != text


def _pin_another_key(cfg: SiteConfig, tmp_path: Path) -> None:
    write_keypair(tmp_path / "other.key", cfg.coordinator_public_key)


def _change_schema(cfg: SiteConfig, tmp_path: Path) -> None:
    _schema(cfg.schema_path, bounds=[(0.0, 130.0), (40.0, 250.0), (50.0, 700.0), (30.0, 220.0)])


def _age_bank(cfg: SiteConfig, tmp_path: Path) -> None:
    past = time.time() - (cfg.max_bank_age_days + 1) * 86400
    os.utime(cfg.bank_path, (past, past))


def _delete_bank(cfg: SiteConfig, tmp_path: Path) -> None:
    cfg.bank_path.unlink()


@pytest.mark.parametrize(("spoil", "culprit", "reason"), [
    (_flip_bank_byte, "bank", "changed after it was signed"),
    (_change_signed_run, "bank_signature", "does not verify"),
    (_pin_another_key, "bank_signature", "not by the coordinator key pinned"),
    (_change_schema, "bank", "another schema"),
    (_age_bank, "bank", "stale"),
    (_delete_bank, "bank", "not found"),
])
def test_refuses_a_bank_it_cannot_trust_and_writes_nothing(
        site_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        spoil: Callable[[SiteConfig, Path], None], culprit: str, reason: str) -> None:
    config, cfg = _site_copy(site_config, tmp_path)
    assert _impute(tmp_path, config) == ExitCode.OK  # the copies are good as they are
    for path in _outputs(tmp_path):
        path.unlink()
    ledger_before = cfg.ledger.read_bytes()
    spoil(cfg, tmp_path)
    capsys.readouterr()
    assert _impute(tmp_path, config) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert str(getattr(cfg, culprit)) in err and reason in err, err
    assert _outputs(tmp_path) == []
    assert cfg.ledger.read_bytes() == ledger_before


def test_load_signed_bank_verifies_before_it_parses(
        site_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, cfg = _site_copy(site_config, tmp_path)
    schema_hash = load_schema(cfg.schema_path).schema_hash()
    args = (cfg.bank_path, cfg.bank_signature_path, cfg.coordinator_public_key, schema_hash)
    signed = load_signed_bank(*args, max_age_days=1.0)
    assert signed.run_id == RUN_ID
    assert signed.key_id == key_id(load_public_key(cfg.coordinator_public_key))
    assert abs(signed.saved_at.timestamp() - cfg.bank_path.stat().st_mtime) < 1e-3
    want = ModelBank.from_bytes(cfg.bank_path.read_bytes())
    np.testing.assert_array_equal(signed.bank.gram, want.gram)
    with pytest.raises(BankError, match="stale"):
        load_signed_bank(*args, max_age_days=1.0, now=time.time() + 2 * 86400)
    with pytest.raises(BankError, match="another schema"):
        load_signed_bank(*args[:3], "0" * 64)

    def parse(*_: object, **__: object) -> ModelBank:
        raise AssertionError("a bank was parsed before its signature verified")

    monkeypatch.setattr(ModelBank, "from_bytes", parse)
    _flip_bank_byte(cfg, tmp_path)
    with pytest.raises(SignatureError, match="changed after it was signed"):
        load_signed_bank(*args)
    # even when the sidecar is edited to the tampered bank's digest, verification refuses it
    doc = cfg.bank_signature_path.read_text()
    old = read_signature_file(cfg.bank_signature_path)
    cfg.bank_signature_path.write_text(doc.replace(
        old["bank_sha256"], hashlib.sha256(cfg.bank_path.read_bytes()).hexdigest()))
    with pytest.raises(SignatureError, match="does not verify"):
        load_signed_bank(*args)


def test_mode_needs_site_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["impute", str(_new_rows(tmp_path)), "-o", str(tmp_path / "out.csv"),
                 "--mode", "hybrid"])
    assert code == ExitCode.USAGE and "--mode needs --site-config" in capsys.readouterr().err
    assert _outputs(tmp_path) == []
