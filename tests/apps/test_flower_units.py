"""Units behind the Flower apps: message records, site TOML, signatures, TLS material,
deployment helpers, the run configuration and the CLI registration."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord, RecordDict

from coordinator.config import CoordinatorConfig
from fediim.cli import SUBCOMMANDS, main
from fediim.cli.deploy import register_local_deploy
from fediim.deploy.layout import _site_ids, app_pyproject, prepare_federation
from fediim.deploy.supervisor import stray_processes
from fediim.errors import (
    ConfigError,
    DeployError,
    ExitCode,
    RunNotCompleted,
    SchemaError,
    SimulationUnavailable,
)
from fediim.federated.plan import MODES, PLAN_DEFAULTS
from fediim.io.schema import TableSchema
from fediim.privacy import PrivacyLedger
from fediim.protocol.messages import (
    CONFIG_RECORD,
    HandshakeReply,
    HandshakeRequest,
    ImputeReply,
    ImputeRequest,
    LedgerView,
    MessageError,
    ReleaseReply,
    ReleaseRequest,
    ReplyCode,
    parse_request,
)
from fediim.protocol.run_config import (
    NOISY_MAX_DEPTH,
    RUN_CONFIG_DEFAULTS,
    RunConfig,
    privacy_plan,
)
from fediim.protocol.signing import (
    SignatureError,
    SigningKeyError,
    key_id,
    load_private_key,
    load_public_key,
    sign_bank,
    verify_bank,
    write_keypair,
)
from fediim.protocol.site_config import (
    Budget,
    SiteConfigError,
    load_site_config,
    site_config_toml,
)
from fediim.protocol.tls import write_node_auth_keypair, write_tls_files
from tests.paths import REPO

ROOT = REPO
HASH = "ab" * 32
PRIV = {"schema_hash": HASH, "coordinator_key_id": "ed25519:" + "0" * 64, "epsilon": 1.5,
        "delta": 1e-6}


# -- messages ---------------------------------------------------------------------------


@pytest.mark.parametrize("msg", [
    HandshakeRequest(**PRIV),
    ReleaseRequest(**PRIV, seed=3, seed_index=1, max_depth=4),
    ImputeRequest(schema_hash=HASH, coordinator_key_id="k", bank=b"\x00\x01npz",
                  signature=bytes(range(64)), mode="federated", k=7),
])
def test_requests_round_trip_through_records(msg: object) -> None:
    rd = msg.to_record()  # type: ignore[attr-defined]
    assert isinstance(rd, RecordDict)
    assert rd.config_records[CONFIG_RECORD]["stage"] == msg.STAGE  # type: ignore[attr-defined]
    assert parse_request(rd) == msg


def test_replies_round_trip_with_ledger_and_bytes() -> None:
    view = LedgerView(releases=2, rho_budget=1.0, rho_spent=0.25, rho_remaining=0.75,
                      delta=1e-6, epsilon_spent=2.1, epsilon_budget=5.3, insecure_noise=True)
    for rep in (
        HandshakeReply(site_id="a", rho_requested=0.2, ledger=view),
        HandshakeReply(site_id="a", code=ReplyCode.SCHEMA_MISMATCH),
        ReleaseReply(site_id="b", bank=b"\xff" * 10, n_cells=3, ledger=view),
        ImputeReply(site_id="c", ledger=view),
    ):
        rd = rep.to_record()
        back = type(rep).from_record(rd)
        assert back == rep
        assert back.ok is (rep.code is ReplyCode.OK)
    # the ledger travels as a MetricRecord, bytes as a uint8 ArrayRecord
    rd = ReleaseReply(site_id="b", bank=b"xyz", n_cells=1, ledger=view).to_record()
    assert dict(rd.metric_records["fediim.ledger"])["rho_spent"] == 0.25
    assert rd.array_records["fediim.arrays"]["bank"].numpy().dtype == np.uint8


def test_float64_values_round_trip_exactly() -> None:
    eps = float(np.nextafter(1.0, 2.0))
    req = HandshakeRequest(**{**PRIV, "epsilon": eps})
    assert parse_request(req.to_record()).epsilon == eps


@pytest.mark.parametrize("bad", [
    RecordDict(),
    RecordDict({CONFIG_RECORD: ConfigRecord({"protocol": "other/9", "stage": "handshake"})}),
    RecordDict({CONFIG_RECORD: ConfigRecord({"protocol": "fediim-flower/1", "stage": "x"})}),
    RecordDict({CONFIG_RECORD: ConfigRecord({"protocol": "fediim-flower/1",
                                             "stage": "handshake", "epsilon": -1.0})}),
])
def test_malformed_requests_are_message_errors(bad: RecordDict) -> None:
    with pytest.raises(MessageError):
        parse_request(bad)


def test_a_reply_of_the_wrong_stage_is_rejected() -> None:
    rd = HandshakeReply(site_id="a").to_record()
    with pytest.raises(MessageError, match="expected a 'release' message"):
        ReleaseReply.from_record(rd)


def test_unknown_fields_are_rejected() -> None:
    rd = HandshakeRequest(**PRIV).to_record()
    rd.config_records[CONFIG_RECORD]["surprise"] = 1
    with pytest.raises(MessageError, match="surprise"):
        parse_request(rd)


# -- site configuration ----------------------------------------------------------------


def _site_toml(tmp_path: Path, **extra: str) -> Path:
    body = {
        "site_id": '"hosp-a"', "data": '"a.csv"', "schema": '"s.toml"',
        "ledger": '"out/ledger.json"', "output_dir": '"out"',
        "coordinator_public_key": '"coord.pub"', **extra,
    }
    text = "\n".join(f"{k} = {v}" for k, v in body.items() if v)
    text += "\n\n[budget]\nepsilon = 3.0\ndelta = 1e-6\n"
    p = tmp_path / "site.toml"
    p.write_text(text)
    return p


def test_site_config_resolves_paths_and_round_trips(tmp_path: Path) -> None:
    cfg = load_site_config(_site_toml(tmp_path))
    assert cfg.site_id == "hosp-a" and cfg.data == tmp_path / "a.csv"
    assert cfg.schema_path == tmp_path / "s.toml" and cfg.ledger == tmp_path / "out/ledger.json"
    assert cfg.insecure_seeded_noise is False
    assert cfg.budget.rho == pytest.approx(Budget(epsilon=3.0, delta=1e-6).rho)
    again = tmp_path / "again.toml"
    again.write_text(site_config_toml(cfg))
    assert load_site_config(again) == cfg


@pytest.mark.parametrize(("extra", "match"), [
    ({"coordinator_public_key": ""}, "coordinator_public_key"),
    ({"site_id": '"../etc"'}, "site_id"),
    ({"colour": '"blue"'}, "colour: unknown key"),
    ({"insecure_seeded_noise": '"yes"'}, "insecure_seeded_noise"),
])
def test_site_config_errors_name_the_key(tmp_path: Path, extra: dict[str, str],
                                         match: str) -> None:
    with pytest.raises(SiteConfigError, match=match):
        load_site_config(_site_toml(tmp_path, **extra))


def test_site_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SiteConfigError, match="not found"):
        load_site_config(tmp_path / "nope.toml")


# -- signatures --------------------------------------------------------------------------


def test_bank_signature_binds_bank_schema_and_run(tmp_path: Path) -> None:
    pub = write_keypair(tmp_path / "k.key", tmp_path / "k.pub")
    assert stat.S_IMODE(os.stat(tmp_path / "k.key").st_mode) == 0o600
    key = load_private_key(tmp_path / "k.key")
    assert key_id(key) == key_id(load_public_key(tmp_path / "k.pub")) == key_id(pub)
    sig = sign_bank(key, b"bank", HASH, 7)
    verify_bank(pub, sig, b"bank", HASH, 7)
    for args in ((b"bank!", HASH, 7), (b"bank", "cd" * 32, 7), (b"bank", HASH, 8)):
        with pytest.raises(SignatureError):
            verify_bank(pub, sig, *args)
    other = write_keypair(tmp_path / "o.key", tmp_path / "o.pub")
    with pytest.raises(SignatureError):
        verify_bank(other, sig, b"bank", HASH, 7)


def test_key_files_are_checked(tmp_path: Path) -> None:
    with pytest.raises(SigningKeyError, match="not found"):
        load_public_key(tmp_path / "missing.pub")
    (tmp_path / "junk.pub").write_text("hello")
    with pytest.raises(SigningKeyError, match="not a PEM public key"):
        load_public_key(tmp_path / "junk.pub")
    tls = write_tls_files(tmp_path / "pki")  # an EC key is not an Ed25519 signing key
    with pytest.raises(SigningKeyError, match="expected an Ed25519 key"):
        load_private_key(tls.server_key)


# -- TLS and node keys -------------------------------------------------------------------


def test_tls_material(tmp_path: Path) -> None:
    tls = write_tls_files(tmp_path / "pki")
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    srv = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    ca.public_key().verify(srv.signature, srv.tbs_certificate_bytes,  # type: ignore[call-arg]
                           ec.ECDSA(srv.signature_hash_algorithm))  # type: ignore[arg-type]
    for key in (tls.ca_key, tls.server_key):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600


def test_node_auth_keys_are_openssh_ec(tmp_path: Path) -> None:
    write_node_auth_keypair(tmp_path / "n.key", tmp_path / "n.pub")
    priv = serialization.load_ssh_private_key((tmp_path / "n.key").read_bytes(), None)
    pub = serialization.load_ssh_public_key((tmp_path / "n.pub").read_bytes())
    assert isinstance(priv, ec.EllipticCurvePrivateKey)
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    assert stat.S_IMODE(os.stat(tmp_path / "n.key").st_mode) == 0o600


# -- deployment helpers and run configuration --------------------------------------------


def test_site_ids_from_file_names() -> None:
    got = _site_ids([Path("a/Hospital A.csv"), Path("b/Hospital A.csv"), Path("x/_.csv")])
    assert got == ["Hospital-A", "Hospital-A-2", "site"]


def _schema_file(tmp_path: Path) -> Path:
    p = tmp_path / "schema.toml"
    p.write_text(TableSchema.model_validate(
        {"columns": [{"name": "x", "bounds": (0.0, 1.0)}]}).to_toml())
    return p


def test_prepare_federation_writes_site_tomls_and_reuses_the_key(tmp_path: Path) -> None:
    schema = _schema_file(tmp_path)
    data = [tmp_path / "a.csv", tmp_path / "b.csv"]
    lay = prepare_federation(data, schema, tmp_path / "out", epsilon=2.0, budget_epsilon=6.0)
    assert [s.site_id for s in lay.sites] == ["a", "b"]
    assert stat.S_IMODE(os.stat(lay.signing_key).st_mode) == 0o600
    cfg = load_site_config(lay.sites[0].config)
    assert cfg.budget.epsilon == 6.0 and cfg.coordinator_public_key == lay.public_key
    assert cfg.ledger == lay.sites[0].ledger and cfg.output_dir == lay.sites[0].directory
    assert lay.run_config["min-sites"] == 2 and lay.run_config["epsilon"] == 2.0
    first = lay.public_key.read_bytes()
    prepare_federation(data, schema, tmp_path / "out", epsilon=2.0, budget_epsilon=6.0)
    assert lay.public_key.read_bytes() == first
    with pytest.raises(DeployError, match="unique site id"):
        prepare_federation(data, schema, tmp_path / "o2", site_ids=["x", "x"])


def test_app_pyproject_is_a_valid_flower_app() -> None:
    from flwr.common.config import validate_config

    text = app_pyproject({"epsilon": 2.5, "schema": "/s.toml", "seed": -1})
    doc = tomllib.loads(text)
    ok, errors, _ = validate_config(doc, check_module=False)
    assert ok, errors
    assert doc["tool"]["flwr"]["app"]["config"]["epsilon"] == 2.5
    assert set(doc["tool"]["flwr"]["app"]["config"]) == set(RUN_CONFIG_DEFAULTS)
    with pytest.raises(DeployError, match="unknown run-config"):
        app_pyproject({"nope": 1})


def test_repository_pyproject_declares_the_app_and_every_run_config_key() -> None:
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app = doc["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "coordinator.app:app",
                                 "clientapp": "site_client.app:app"}
    assert app["config"] == RUN_CONFIG_DEFAULTS


def test_coordinator_config_from_run_config(tmp_path: Path) -> None:
    cfg = CoordinatorConfig.from_run_config({**RUN_CONFIG_DEFAULTS, "schema": "s.toml",
                                             "signing-key": "k", "out-dir": "o",
                                             "min-sites": 3, "expected-sites": 5})
    assert cfg.min_sites == 3 and cfg.wanted_sites == 5 and cfg.schema_path == Path("s.toml")
    with pytest.raises(ConfigError, match="schema"):
        CoordinatorConfig.from_run_config(dict(RUN_CONFIG_DEFAULTS))
    with pytest.raises(ConfigError, match="min-sites"):
        CoordinatorConfig.from_run_config({**RUN_CONFIG_DEFAULTS, "schema": "s",
                                           "signing-key": "k", "out-dir": "o",
                                           "min-sites": 0})


def test_stray_process_scan_finds_only_marked_processes() -> None:
    import subprocess
    import sys

    marker = "test-" + os.urandom(6).hex()
    assert stray_processes(marker) == []
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                            env={**os.environ, "FEDIIM_DEPLOY_ID": marker})
    try:
        import time

        deadline = time.monotonic() + 20  # until the child has exec'd with its environment
        while stray_processes(marker) != [proc.pid] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stray_processes(marker) == [proc.pid]
    finally:
        proc.kill()
        proc.wait()
    assert stray_processes(marker) == []


def test_local_deploy_is_a_registered_subcommand(capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    assert register_local_deploy in SUBCOMMANDS
    assert main(["local-deploy", "--help"]) == 0
    assert "--min-sites" in capsys.readouterr().out
    assert main(["local-deploy", "--data", str(tmp_path / "no.csv"), "--schema", "s",
                 "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize(("exc", "code"), [
    (RunNotCompleted("run 7 ended as 'finished:failed'", federation={"sites": {"a": {
        "active": False, "stages": {"handshake": {"code": "schema_mismatch",
                                                  "reason": "hash differs"}}}}}),
     ExitCode.FAILED),
    (DeployError("the SuperLink was not healthy within 60 s"), ExitCode.FAILED),
    (SimulationUnavailable("the Simulation Engine needs Ray"), ExitCode.USAGE),
    (SchemaError("s.toml: columns: expected a table"), ExitCode.USAGE),
    (KeyboardInterrupt(), ExitCode.INTERRUPTED),
])
def test_local_deploy_exit_codes_follow_the_error_type(
        exc: BaseException, code: ExitCode, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import fediim.cli.deploy

    def _fail(*args: object, **kwargs: object) -> None:
        raise exc

    monkeypatch.setattr(fediim.cli.deploy, "local_deploy", _fail)
    data = tmp_path / "a.csv"
    data.write_text("x\n1\n")
    assert main(["local-deploy", "--data", str(data), "--schema", "s",
                 "--out", str(tmp_path / "out")]) == code
    err = capsys.readouterr().err
    assert str(exc) in err
    if isinstance(exc, RunNotCompleted):  # what each site did is printed
        assert "a: EXCLUDED (handshake: schema_mismatch: hash differs)" in err


def test_local_deploy_passes_the_aggregation_and_checks_the_threshold(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import fediim.cli.deploy

    seen: dict[str, object] = {}

    def _record(*args: object, **kwargs: object) -> None:
        seen.update(kwargs)
        raise DeployError("stop here")

    monkeypatch.setattr(fediim.cli.deploy, "local_deploy", _record)
    data = tmp_path / "a.csv"
    data.write_text("x\n1\n")
    base = ["local-deploy", "--data", str(data), "--data", str(data), "--data", str(data),
            "--schema", "s", "--out", str(tmp_path / "out")]
    assert main([*base, "--aggregation", "secure", "--secure-threshold", "3"]) == 1
    assert seen["run_config"]["aggregation"] == "secure"  # type: ignore[index]
    assert seen["run_config"]["secure-threshold"] == 3  # type: ignore[index]
    for bad, says in (("1", "0 (two thirds"), ("4", "exceeds the 3 site")):
        assert main([*base, "--secure-threshold", bad]) == ExitCode.USAGE
        assert says in capsys.readouterr().err
    with pytest.raises(ConfigError, match="threshold of 1"):
        CoordinatorConfig.from_run_config({**RUN_CONFIG_DEFAULTS, "schema": "s",
                                           "signing-key": "k", "out-dir": "o",
                                           "secure-threshold": 1})


def test_ledger_untouched_by_handshake_refusal_is_byte_identical(tmp_path: Path) -> None:
    # PrivacyLedger.open on an existing file does not rewrite it (the site relies on this)
    led = PrivacyLedger.create(tmp_path / "l.json", 0.5, "a")
    before = (tmp_path / "l.json").read_bytes()
    PrivacyLedger.open(tmp_path / "l.json", 0.5, "a").can_afford(1.0)
    assert (tmp_path / "l.json").read_bytes() == before and led.entries == ()


def test_run_config_defaults_follow_the_library_defaults() -> None:
    """The Flower run's defaults must be the in-process defaults (plan_privacy, FederatedIIM),
    so that both paths give the same bank for the same inputs."""
    import inspect

    from fediim.federated import FederatedIIM, plan_privacy

    plan = inspect.signature(plan_privacy).parameters
    fed = inspect.signature(FederatedIIM).parameters
    for key in ("min-records", "count-fraction", "cell-noise-ratio", "principal-axes"):
        name = key.replace("-", "_")
        assert RUN_CONFIG_DEFAULTS[key] == getattr(PLAN_DEFAULTS, name) == plan[name].default \
            == fed[name].default, key
    # The depth cap and the number of trees default by budget (None); a Flower run is
    # always private (finite epsilon), where that means max-depth 16 and one tree.
    assert PLAN_DEFAULTS.max_depth is None and PLAN_DEFAULTS.n_trees is None
    assert plan["max_depth"].default is None and fed["max_depth"].default is None
    assert plan["n_trees"].default is None and fed["n_trees"].default is None
    noisy = plan_privacy(1.0, 1e-6, 4)
    assert RUN_CONFIG_DEFAULTS["max-depth"] == NOISY_MAX_DEPTH == noisy.partition.max_depth
    assert noisy.n_trees == 1
    assert RUN_CONFIG_DEFAULTS["k"] == fed["n_neighbors"].default
    assert RUN_CONFIG_DEFAULTS["mode"] == fed["mode"].default
    assert RUN_CONFIG_DEFAULTS["epsilon"] == fed["epsilon"].default
    assert RUN_CONFIG_DEFAULTS["delta"] == fed["delta"].default


def test_the_run_config_turns_the_principal_axes_off() -> None:
    """``principal-axes = false`` reaches the plan the coordinator and every site compute."""
    assert RunConfig().plan_params().principal_axes is True
    off = RunConfig.model_validate({**RUN_CONFIG_DEFAULTS, "principal-axes": False})
    assert off.plan_params().principal_axes is False
    assert privacy_plan(1.0, 1e-6, 4, off.plan_params()).principal_axes is False


def test_the_run_config_is_declared_once() -> None:
    """RunConfig is the source: the coordinator's configuration is RunConfig, the requests
    carry its plan fields, the modes are the library's, and the CLI offers the same."""
    import argparse
    import dataclasses
    import typing

    from fediim.cli.deploy import _add_run_arguments
    from fediim.protocol.messages import HandshakeRequest, ImputeRequest

    assert issubclass(CoordinatorConfig, RunConfig)
    assert RUN_CONFIG_DEFAULTS == RunConfig().model_dump(by_alias=True)
    assert typing.get_args(RunConfig.model_fields["mode"].annotation) == MODES
    assert typing.get_args(ImputeRequest.model_fields["mode"].annotation) == MODES
    request = HandshakeRequest(**PRIV)
    assert request.plan_params() == RunConfig().plan_params()
    assert request.plan_params() == dataclasses.replace(PLAN_DEFAULTS, max_depth=NOISY_MAX_DEPTH)
    parser = argparse.ArgumentParser()
    _add_run_arguments(parser)
    args = parser.parse_args(["--data", "a.csv", "--schema", "s", "--out", "o"])
    mode = next(a for a in parser._actions if a.dest == "mode")
    assert tuple(mode.choices) == MODES
    for key in ("epsilon", "delta", "mode", "k"):
        assert getattr(args, key) == RUN_CONFIG_DEFAULTS[key], key


def test_ledger_view_from_a_ledger_summary(tmp_path: Path) -> None:
    led = PrivacyLedger.create(tmp_path / "l.json", 0.5, "a")
    view = LedgerView.from_summary(led.summary(1e-6))
    assert view.rho_budget == 0.5 and view.rho_spent == 0.0 and view.releases == 0
    assert view.insecure_noise is False


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_app_bundle_carries_no_code() -> None:
    """`flwr run .` ships only pyproject.toml (+ README): sites run the fediim they installed,
    so a coordinator cannot push code to a hospital through a run."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT))).namelist()
    assert "pyproject.toml" in names
    assert not [n for n in names if n.endswith(".py")], names
