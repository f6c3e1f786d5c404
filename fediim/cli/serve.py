"""``fediim serve``: the site's imputation service over HTTP, from its signed bank."""

from __future__ import annotations

import argparse
import logging
import sys

from fediim.cli.argtypes import positive_int
from fediim.cli.common import Subparsers, add_parser, error
from fediim.errors import ExitCode, FediimError

__all__ = ["register_serve"]

#: ``fediim serve --help``: what the service does and its endpoints ...
SERVE_DESCRIPTION = """\
Serve imputations at the site, every day, from the signed bank of its last federation
run: the bank's signature is verified (under the coordinator key pinned in the site TOML,
for the site's schema) before a byte of it is read, a bank older than max_bank_age_days is
refused, and the site's choices and models are made once, at start-up, on the site's own
rows (its data file). Each request then only imputes its rows, exactly as
fediim impute --site-config would. No budget is spent: the ledger is only read.

Endpoints:
  POST /v1/impute   rows as JSON {"rows": [{"col": number or null, ...}, ...]} or as a
                    CSV body (Content-Type: text/csv, header = the schema's columns;
                    a coded column's cells are its declared levels either way);
                    returns the completed rows and, per imputed cell, value, method
                    (hybrid, bank, iim, mean, fallback), uncertainty and, for a
                    binary or categorical level, its probability. ?draws=M (2-20)
                    adds each imputed cell's M multiple-imputation draws (as
                    fediim impute --multiple M draws them; slow: each draw prepares
                    its own engine). A bad row is a 422 naming the row and column;
                    too many rows or bytes a 413; a bank that has grown stale a 503.
  GET  /healthz     200 {"status": "ok"}, or 503 once the bank is stale (no token needed)
  GET  /metrics     Prometheus metrics: requests, rows, cells by method, fallback rate,
                    latency histogram, bank version and age, budget spent and remaining,
                    monitored error per column (RMSE, or a coded column's level error
                    rate), drift (a categorical column's by its level frequencies)
  GET  /            the status page for the site's staff (a browser may log in with any
                    user name and the token as the password)

Every endpoint but /healthz needs "Authorization: Bearer <token>" when the site TOML's
[serve] table names a token (token_file or token_env); without a token the service
listens on a loopback address only. No input row and no imputed value is ever logged."""

#: ... and how it is started.
SERVE_EPILOG = """\
examples:
  fediim serve --site-config site.toml
  fediim serve --site-config site.toml --host 0.0.0.0 --port 8787   # needs a token
  curl -H "Authorization: Bearer $(cat serve.token)" -H 'Content-Type: application/json' \\
       -d '{"rows": [{"age": 61, "chol": null}]}' http://127.0.0.1:8787/v1/impute"""


def register_serve(sub: Subparsers) -> None:
    """Add ``fediim serve`` to ``sub``."""
    p = add_parser(sub, "serve",
                   help="serve imputations over HTTP from this site's signed federation bank",
                   description=SERVE_DESCRIPTION, epilog=SERVE_EPILOG)
    p.add_argument("--site-config", metavar="SITE.toml", required=True,
                   help="the site's TOML (bank, signature, pinned key, schema, data, [serve])")
    p.add_argument("--host", help="address to listen on (default: [serve] host, 127.0.0.1)")
    p.add_argument("--port", type=positive_int,
                   help="port to listen on (default: [serve] port, 8787)")
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    # The web stack loads here only: no other command pays for it.
    from fediim.serve.app import create_app
    from fediim.serve.auth import check_binding, load_token
    from fediim.serve.service import ServiceState
    from fediim.serve.site import Site

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    try:
        site = Site.open(args.site_config)
        settings = site.config.serve
        host, port = args.host or settings.host, args.port or settings.port
        token = load_token(settings)
        check_binding(host, token)
        state = ServiceState(site)
    except FediimError as exc:
        error(str(exc))
        return exc.exit_code
    print(f"fediim serve: site {site.config.site_id}, bank of run {site.signed.run_id} "
          f"(signature verified, saved {site.signed.saved_at:%Y-%m-%d}), mode "
          f"{site.engine.settings.mode}, {state.n_plans} plans prepared in "
          f"{state.startup_seconds:.1f} s; listening on http://{host}:{port} "
          f"({'token required' if token else 'loopback only, no token'})", file=sys.stderr)
    import gc

    import uvicorn

    # The prepared models live as long as the process: the collector need not walk them
    # again (its full passes would land in the latency of whichever request triggers one).
    gc.collect()
    gc.freeze()
    uvicorn.run(create_app(state, token), host=host, port=port, log_level="info",
                access_log=True)
    return ExitCode.OK
