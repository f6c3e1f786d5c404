"""``fediim ledger init|show``: create a site's privacy ledger once, and read it."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from fediim.cli.common import Subparsers, add_parser, error
from fediim.errors import ExitCode, FediimError
from fediim.privacy import PrivacyLedger
from fediim.protocol.site_config import SiteConfig, load_site_config

__all__ = ["register_ledger"]


def register_ledger(sub: Subparsers) -> None:
    p = add_parser(
        sub, "ledger", help="create or show a site's privacy ledger",
        description="""\
A site's ledger records every release it made (mechanism, sensitivity, noise, rho,
purpose, time) against its total privacy budget. It is created once, explicitly, with
'init'; afterwards the site refuses to run if it is missing, so a deleted or misplaced
ledger can never start a fresh budget unnoticed.""",
        epilog="""\
examples:
  fediim ledger init --site-config site.toml
  fediim ledger show --site-config site.toml --json""")
    actions = p.add_subparsers(title="actions", metavar="ACTION")
    init = add_parser(actions, "init", help="create the ledger named in the site TOML",
                      description="Create the ledger at the path and with the budget of "
                                  "the site TOML; refuses if one is already there.",
                      epilog="example:\n  fediim ledger init --site-config site.toml")
    show = add_parser(actions, "show", help="print the ledger's spend and releases",
                      description="Verify the ledger and print what it spent.",
                      epilog="example:\n  fediim ledger show --site-config site.toml")
    for action, func in ((init, _run_init), (show, _run_show)):
        action.add_argument("--site-config", metavar="SITE.toml", required=True,
                            help="the site's configuration (names the ledger and budget)")
        action.set_defaults(func=func)
    show.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=lambda args: _missing_action(p))


def _missing_action(parser: argparse.ArgumentParser) -> int:
    parser.print_usage()
    error("expected an action: init or show")
    return ExitCode.USAGE


def _run_init(args: argparse.Namespace) -> int:
    return _on_site_ledger(args, _create)


def _run_show(args: argparse.Namespace) -> int:
    return _on_site_ledger(args, _show)


def _on_site_ledger(args: argparse.Namespace,
                    action: Callable[[SiteConfig, argparse.Namespace], None]) -> int:
    """Run ``action`` on the site TOML's configuration; a fediim error is its exit code."""
    try:
        action(load_site_config(args.site_config), args)
    except FediimError as exc:
        error(str(exc))
        return exc.exit_code
    return ExitCode.OK


def _create(cfg: SiteConfig, args: argparse.Namespace) -> None:
    ledger = PrivacyLedger.create(cfg.ledger, cfg.budget.rho, cfg.site_id)
    print(f"created ledger {ledger.path} for site {cfg.site_id!r}: budget "
          f"epsilon={cfg.budget.epsilon:g} at delta={cfg.budget.delta:g} "
          f"(rho={cfg.budget.rho:.6g})")


def _show(cfg: SiteConfig, args: argparse.Namespace) -> None:
    ledger = PrivacyLedger.open(cfg.ledger, cfg.budget.rho, cfg.site_id)
    summary = ledger.summary(cfg.budget.delta)
    if args.json:
        entries = [e.to_dict() for e in ledger.entries]
        print(json.dumps({**summary, "entries": entries}, indent=2))
    else:
        print(_describe(cfg, ledger, summary))


def _describe(cfg: SiteConfig, ledger: PrivacyLedger, summary: dict) -> str:
    lines = [f"ledger {ledger.path} (site {cfg.site_id!r})",
             f"spent epsilon {summary['epsilon_spent']:.4g} of {summary['epsilon_budget']:.4g} "
             f"at delta {summary['delta']:g} (rho {summary['rho_spent']:.6g} of "
             f"{summary['rho_budget']:.6g}) in {summary['releases']} release(s)"]
    if summary.get("insecure_noise"):
        lines.append("INSECURE: some releases used seeded noise, which whoever knows the seed "
                     "can subtract (simulations only)")
    lines += [f"  {e.time}  rho={e.rho:.6g}  sigma={e.sigma:.4g}  {e.mechanism}: {e.purpose}"
              + ("" if e.assumption is None else f"  [assumes: {e.assumption}]")
              for e in ledger.entries]
    return "\n".join(lines)
