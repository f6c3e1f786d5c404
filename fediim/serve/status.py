"""The status page at ``/``: plain server-rendered HTML for the site's staff, no external
asset, no script. Five panels: the bank, the budget, the traffic, the monitored quality and
the drift state. Aggregates only: no row and no imputed value is ever shown."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from html import escape

from fediim.serve.service import ServiceState

__all__ = ["render_status"]

#: Budget history rows shown (the most recent).
HISTORY_ROWS = 20

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#1b1f24;background:#f6f7f9}
h1{font-size:1.4rem}section{background:#fff;border:1px solid #d0d4da;border-radius:6px;
padding:.8rem 1rem;margin:0 0 1rem}h2{font-size:1.1rem;margin:.2rem 0 .6rem}
table{border-collapse:collapse}td,th{padding:.2rem .8rem .2rem 0;text-align:left}
.ok{color:#116329;font-weight:600}.bad{color:#a40e26;font-weight:600}
.muted{color:#57606a}
"""


def _number(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _flag(good: bool, yes: str, no: str) -> str:
    return f'<span class="{"ok" if good else "bad"}">{escape(yes if good else no)}</span>'


def _bank(state: ServiceState) -> str:
    site, signed = state.site, state.site.signed
    age, limit = state.bank_age_days(), site.config.max_bank_age_days
    return _table(["", ""], [
        ("Run (version)", str(signed.run_id)),
        ("Signature", f"verified at start-up under the pinned coordinator key {signed.key_id}"),
        ("Stored", f"{signed.saved_at:%Y-%m-%d %H:%M} UTC"),
        ("Age", f"{age:.1f} days (limit {limit:g})"),
        ("Mode", site.engine.settings.mode),
        ("Prepared plans", str(site.engine.n_plans)),
    ]) + "<p>" + _flag(not state.bank_is_stale(), "fresh: serving",
                       "stale: refusing requests; join a new federation run") + "</p>"


def _budget(state: ServiceState) -> str:
    view = state.budget()
    if view.summary is None:
        return f'<p class="bad">ledger unreadable: {escape(view.error or "")}</p>'
    s = view.summary
    summary = _table(["", ""], [
        ("Epsilon spent", f"{_number(s['epsilon_spent'])} of {_number(s['epsilon_budget'])} "
                          f"(delta {s['delta']:g})"),
        ("Epsilon remaining", _number(s["epsilon_remaining"])),
        ("rho spent / remaining", f"{_number(s['rho_spent'])} / {_number(s['rho_remaining'])}"),
        ("Releases", str(s["releases"])),
    ])
    recent = view.history[-HISTORY_ROWS:]
    history = _table(["Time (UTC)", "Purpose", "rho", "Epsilon spent after"],
                     [(e["time"], e["purpose"], _number(e["rho"]),
                       _number(e["epsilon_spent_after"])) for e in reversed(recent)])
    more = (f'<p class="muted">the {HISTORY_ROWS} most recent of {len(view.history)}</p>'
            if len(view.history) > HISTORY_ROWS else "")
    return (summary + "<p class=\"muted\">Serving spends no budget; the ledger is read "
            "only.</p><h3>History</h3>" + history + more)


def _traffic(state: ServiceState) -> str:
    totals, recent = state.totals(), state.recent_traffic()
    return _table(["", ""], [
        ("Requests", str(totals["requests"])),
        ("Refused", f"{totals['refused']} (bad rows, too large, stale bank)"),
        ("Rows", str(totals["rows"])),
        ("Cells imputed", str(totals["cells_imputed"])),
        ("Request rate", f"{recent['requests_per_second']:.2f}/s over the last minute"),
        ("Latency p50 / p99", f"{_number(recent['latency_p50_ms'])} / "
                              f"{_number(recent['latency_p99_ms'])} ms "
                              f"({int(recent['latency_samples'])} recent requests)"),
        ("Fallback rate", f"{totals['fallback_rate']:.2%} "
                          f"({totals['fallback_cells']} cells)"),
    ])


def _quality(state: ServiceState) -> str:
    rmse, level_error_rate, counts = state.monitored()
    sd, baseline = state.drift.column_scale, state.drift.baseline_rmse
    voted = state.quality.voted
    rows = [(name, f"{_number(level_error_rate[j])} of levels wrong", "", "",
             str(int(counts[j]))) if voted[j] else
            (name, _number(rmse[j]), _number(rmse[j] / sd[j]), _number(baseline[j]),
             str(int(counts[j]))) for j, name in enumerate(state.site.columns)]
    fraction = state.quality.fraction
    return (f"<p class=\"muted\">{fraction:.0%} of incoming complete rows get one cell "
            "masked, imputed and scored: by its RMSE, or for a binary or categorical "
            "column by the share imputed with another level than the true one.</p>"
            + _table(["Column", "RMSE", "RMSE / sd", "Validated RMSE", "Cells"], rows))


def _drift(state: ServiceState) -> str:
    drift, settings = state.drift_state(), state.site.config.serve
    rows = [(name, _number(drift.mean_shift[j]), _number(drift.error_ratio[j]),
             drift.drifted.get(j, "no")) for j, name in enumerate(state.site.columns)]
    verdict = _flag(not drift.drift, "no drift",
                    "DRIFT: the rows no longer look like the bank's; join a new run")
    return (f"<p>{verdict}</p><p class=\"muted\">mean shift threshold "
            f"{settings.drift_mean_shift:g} sd over the last {settings.drift_window} "
            f"rows (after {settings.drift_min_rows}); error threshold "
            f"{settings.drift_error_ratio:g}x the validated RMSE (after "
            f"{settings.drift_min_cells} cells)</p>"
            + _table(["Column", "Mean shift (sd)", "Error ratio", "Drift"], rows))


def render_status(state: ServiceState) -> str:
    """The status page of ``state``, as one HTML document."""
    panels = [("bank", "Bank", _bank), ("budget", "Privacy budget", _budget),
              ("traffic", "Traffic", _traffic), ("quality", "Monitored quality", _quality),
              ("drift", "Drift", _drift)]
    body = "".join(f'<section id="{key}"><h2>{title}</h2>{render(state)}</section>'
                   for key, title, render in panels)
    site = escape(state.site.config.site_id)
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"refresh\" content=\"30\">"
            f"<title>fediim serve: {site}</title><style>{_STYLE}</style></head><body>"
            f"<h1>fediim imputation service: site {site}</h1>{body}"
            f"<p class=\"muted\">Rendered {state.clock():%Y-%m-%d %H:%M:%S} UTC</p>"
            "</body></html>")
