"""``fediim local-deploy`` and ``fediim simulate``: arguments, the run, the summary."""


from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fediim.cli.argtypes import positive_float, positive_int
from fediim.cli.common import Subparsers, add_parser, error, warn
from fediim.deploy.local import local_deploy
from fediim.deploy.supervisor import DEFAULT_RUN_TIMEOUT
from fediim.errors import ExitCode, FediimError, RunNotCompleted
from fediim.federated.plan import MODES
from fediim.protocol.run_config import RUN_CONFIG_DEFAULTS, RunConfig

__all__ = ["register_local_deploy", "register_simulate"]


_DESCRIPTION = """\
Run a real federation on this machine: one Flower SuperLink (TLS, node authentication) and
one SuperNode per --data file, each SuperNode acting as a hospital with its own data,
privacy ledger and outputs. The coordinator asks every site for a handshake, a private
release of its noised cells (charged to the site's ledger first) and, with the signed
model bank, a local imputation of its own records. Nothing but noised statistics and
counts leaves a site. With --aggregation secure (the default from 3 sites on) the sites
sum every statistic by secure aggregation, each adding a share of the noise: the
coordinator sees only sums over sites (S sites, threshold T; see SECURITY.md).

Layout of OUT:
  OUT/<site>/site.toml          the site's configuration (data, schema, ledger, budget,
                                pinned coordinator public key)
  OUT/<site>/imputed.csv        the site's table with its gaps filled (same columns)
  OUT/<site>/flags.csv          per cell: imputed flag and uncertainty
  OUT/<site>/audit.jsonl        one line per imputed cell
  OUT/<site>/ledger.json        the site's privacy ledger (persists across runs)
  OUT/<site>/bank.npz, bank.sig.json   the signed federation bank the site used
  OUT/coordinator/federation.json      every site's stages, reasons and reported spend
  OUT/coordinator/signing.key, coordinator.pub   the coordinator's Ed25519 key pair
  OUT/logs/                     SuperLink, SuperNode and run logs; deploy.json: the
                                deployment's record (status, timings, dropped sites)

A SuperNode that exits during the run is a site that dropped out, not a failure: the run
goes on without it if --min-sites still holds (the coordinator waits for a silent site
up to the stage's timeout, e.g. --run-config release-timeout=60), and the summary says
which site dropped out and when.

Site ids are the data files' names (A.csv -> A). Each site's budget defaults to this
run's --epsilon: running again into the same OUT is refused by the sites once their
ledgers are spent (use --budget-epsilon for a larger total budget)."""

_EPILOG = """\
examples:
  fediim local-deploy --data a.csv --data b.csv --data c.csv --schema schema.toml --out fed
  fediim local-deploy --data a.csv --data b.csv --schema s.toml --out fed --epsilon 2 \\
      --min-sites 2 --budget-epsilon 10

  fediim local-deploy --data a.csv --data b.csv --data c.csv --schema s.toml --out fed \\
      --min-sites 2 --run-config handshake-timeout=30 --run-config release-timeout=60
  fediim local-deploy --data a.csv --data b.csv --data c.csv --data d.csv --schema s.toml \\
      --out fed --aggregation secure --secure-threshold 3

exit codes: 0 the run completed, 1 the run failed (e.g. quorum not met; see the reasons
printed and OUT/coordinator/federation.json), 2 bad usage or input"""


#: Run-configuration keys that an option of their own or the deployment sets.
_SET_ELSEWHERE = frozenset({"schema", "signing-key", "out-dir", "min-sites", "expected-sites",
                            "epsilon", "delta", "mode", "k", "seed", "site-configs",
                            "aggregation", "secure-threshold"})
_RUN_CONFIG_KEYS = sorted(set(RUN_CONFIG_DEFAULTS) - _SET_ELSEWHERE)


def _run_config_item(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` for a run-configuration key without an option of its own; the value is
    read as TOML (a bare word stays a string) and checked against :class:`RunConfig`."""
    key, sep, raw = (part.strip() for part in text.partition("="))
    if not sep or key not in _RUN_CONFIG_KEYS:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY one of "
                                         f"{', '.join(_RUN_CONFIG_KEYS)}; got {text!r}")
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw
    try:
        checked = RunConfig.model_validate({key: value}).model_dump(by_alias=True)
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(f"{key}: {exc.errors()[0]['msg']}") from None
    return key, checked[key]


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    defaults = RUN_CONFIG_DEFAULTS
    p.add_argument("--data", metavar="SITE.csv", action="append", required=True,
                   help="one site's table (repeat once per site)")
    p.add_argument("--schema", metavar="SCHEMA.toml", required=True,
                   help="the federation's schema (public bounds for every column)")
    p.add_argument("--out", metavar="DIR", required=True, help="output directory")
    p.add_argument("--epsilon", type=positive_float, default=defaults["epsilon"],
                   help="privacy spend of this fit at every site (default: %(default)g)")
    p.add_argument("--delta", type=positive_float, default=defaults["delta"],
                   help="delta of the (epsilon, delta) guarantee (default: %(default)g)")
    p.add_argument("--min-sites", type=positive_int, default=None, metavar="N",
                   help="quorum: the run fails if fewer sites remain after any stage "
                        "(default: every site)")
    p.add_argument("--budget-epsilon", type=positive_float, default=None, metavar="E",
                   help="each site's total budget, kept in its ledger (default: --epsilon)")
    p.add_argument("--mode", choices=MODES, default=defaults["mode"],
                   help="how sites impute (default: %(default)s)")
    p.add_argument("--k", type=positive_int, default=defaults["k"],
                   help="neighbours (default: %(default)s)")
    p.add_argument("--aggregation", choices=("auto", "secure", "per-site"),
                   default=defaults["aggregation"],
                   help="secure: every statistic is summed over sites by secure aggregation "
                        "with distributed noise, so the coordinator sees only sums; per-site: "
                        "each site releases its own noised cells; auto: secure from 3 "
                        "admitted sites on (default: %(default)s)")
    p.add_argument("--secure-threshold", type=int, default=defaults["secure-threshold"],
                   metavar="T", help="secure sums: every sum holds the noise of at least T "
                   "sites, and at most S - T may drop or collude (0: two thirds of the "
                   "admitted sites; default: %(default)s)")
    p.add_argument("--timeout", type=positive_float, default=DEFAULT_RUN_TIMEOUT,
                   metavar="SECONDS", help="give up on the run after this long "
                   "(default: %(default)g)")
    p.add_argument("--run-config", type=_run_config_item, action="append", default=[],
                   metavar="KEY=VALUE", help="set a run-configuration key without an option "
                   "of its own, e.g. release-timeout=60 (seconds the coordinator waits for a "
                   "stage's replies); repeatable")
    p.add_argument("--seed", type=int, default=None,
                   help="SIMULATION ONLY: seeded numpy noise instead of OpenDP's sampler "
                        "(reproducible, and removable by anyone who knows the seed)")


def register_local_deploy(sub: Subparsers) -> None:
    """Register ``fediim local-deploy`` (called from :data:`fediim.cli.SUBCOMMANDS`)."""
    parser = add_parser(sub, "local-deploy", help="run a real Flower federation on localhost "
                        "(one SuperNode per data file)", description=_DESCRIPTION,
                        epilog=_EPILOG)
    _add_run_arguments(parser)
    parser.add_argument("--node-auth", action=argparse.BooleanOptionalAction, default=True,
                        help="SuperNode authentication with registered EC keys (default: on)")
    parser.set_defaults(func=_run_local_deploy, simulation=False)


def register_simulate(sub: Subparsers) -> None:
    """Register ``fediim simulate`` (called from :data:`fediim.cli.SUBCOMMANDS`)."""
    parser = add_parser(
        sub, "simulate", help="run the same federation on Flower's Simulation Engine (needs Ray)",
        description="""\
Run the federation of 'fediim local-deploy' on Flower's Simulation Engine instead of real
SuperNodes: the same ServerApp and ClientApp, each simulated node mapped to one --data
file's site (same OUT layout, same ledgers and outputs). Needs Ray: pip install
'fediim[sim]'. Use --seed for reproducible studies.""",
        epilog="""\
example:
  fediim simulate --data a.csv --data b.csv --schema schema.toml --out sim --seed 1""")
    _add_run_arguments(parser)
    parser.set_defaults(func=_run_local_deploy, simulation=True, node_auth=False)


def _usage_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments before anything is written, or None."""
    missing = [d for d in args.data if not Path(d).is_file()]
    if missing:
        return f"data file(s) not found: {', '.join(missing)}"
    if args.delta >= 1:
        return "--delta must be < 1"
    if args.secure_threshold == 1 or args.secure_threshold < 0:
        return "--secure-threshold must be 0 (two thirds of the sites) or at least 2"
    if args.secure_threshold > len(args.data):
        return f"--secure-threshold {args.secure_threshold} exceeds the {len(args.data)} site(s)"
    if args.min_sites is not None and args.min_sites > len(args.data):
        return f"--min-sites {args.min_sites} exceeds the {len(args.data)} site(s)"
    return None


def _run_local_deploy(args: argparse.Namespace) -> int:
    problem = _usage_problem(args)
    if problem:
        error(problem)
        return ExitCode.USAGE
    run_config: dict[str, Any] = {"mode": args.mode, "k": args.k,
                                  "aggregation": args.aggregation,
                                  "secure-threshold": args.secure_threshold,
                                  **dict(args.run_config)}
    if args.seed is not None:
        run_config["seed"] = int(args.seed)
        warn(f"--seed {args.seed}: every site draws INSECURE seeded noise, which whoever "
             "knows the seed can subtract; for reproducible simulations only")
    try:
        view = local_deploy(args.data, args.schema, args.out, epsilon=args.epsilon,
                            delta=args.delta, min_sites=args.min_sites,
                            budget_epsilon=args.budget_epsilon, run_config=run_config,
                            node_auth=args.node_auth, timeout=args.timeout,
                            insecure_seeded_noise=args.seed is not None,
                            simulation=args.simulation)
    except FediimError as exc:
        if isinstance(exc, RunNotCompleted):
            _print_sites(exc.federation, Path(args.out))
        error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        error("interrupted; every process was stopped")
        return ExitCode.INTERRUPTED
    _print_sites(view, Path(args.out))
    deploy = view["deploy"]
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in deploy["phase_seconds"].items())
    dropped = [entry["site_id"] for entry in deploy.get("dropped", [])]
    print(f"fediim {'simulate' if args.simulation else 'local-deploy'}: run "
          f"{deploy['run_id']} completed in {deploy['seconds']:.0f} s ({phases})"
          + (f" without {len(dropped)} site(s) that dropped out ({', '.join(dropped)})"
             if dropped else "")
          + f" -> {Path(args.out).resolve()}", file=sys.stderr)
    return ExitCode.OK


def _print_sites(view: dict[str, Any], out: Path) -> None:
    """Each site's outcome as the coordinator recorded it, then the sites whose SuperNode
    exited (which the coordinator may know only by node id)."""
    for sid, site in sorted((view.get("sites") or {}).items()):
        ledger = site.get("ledger") or {}
        spend = (f"epsilon spent {ledger['epsilon_spent']:.3g} of {ledger['epsilon_budget']:.3g}"
                 if ledger else "no ledger reported")
        imp = site.get("stages", {}).get("impute", {})
        if site.get("active") and imp.get("code") == "ok":
            print(f"  {sid}: imputed, {spend} -> {out / sid / 'imputed.csv'}", file=sys.stderr)
        elif site.get("active"):
            done = ", ".join(site.get("stages", {})) or "nothing"
            print(f"  {sid}: took part ({done}) but the run stopped; {spend}", file=sys.stderr)
        else:
            bad = next((f"{stage}: {st['code']}: {st['reason']}"
                        for stage, st in site.get("stages", {}).items()
                        if st.get("code") != "ok"), "excluded")
            print(f"  {sid}: EXCLUDED ({bad}); {spend}", file=sys.stderr)
    for dropped in (view.get("deploy") or {}).get("dropped", []):
        into_run = (f", {dropped['seconds_into_run']:.0f} s into the run"
                    if dropped.get("seconds_into_run") is not None else "")
        print(f"  {dropped['site_id']}: DROPPED OUT: its SuperNode exited with code "
              f"{dropped['exit_code']} at {dropped['detected_at']}{into_run} "
              f"(log: {dropped['log']})", file=sys.stderr)
