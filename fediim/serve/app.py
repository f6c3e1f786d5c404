"""The HTTP service (FastAPI): ``POST /v1/impute``, ``GET /healthz``, ``GET /metrics`` and
the status page ``GET /``.

Requests are bounded (``max_body_bytes`` before parsing, ``max_rows`` after); a bad row is
a 422 naming the row and the column; every endpoint but ``/healthz`` needs the bearer
token when the site has one. The service logs what happened (status, row and column of a
refusal, drift changes), never a value: no input row, no imputed cell.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from fediim.errors import DataError
from fediim.serve.auth import authorized
from fediim.serve.metrics import ServiceMetrics
from fediim.serve.rows import SOURCE, RequestTooLarge, rows_from_csv, rows_from_json
from fediim.serve.service import ImputeOutcome, ServiceState
from fediim.serve.status import render_status

__all__ = ["create_app"]

log = logging.getLogger("fediim.serve")

#: The most multiple-imputation draws one request may ask for (``?draws=M``).
MAX_DRAWS = 20
#: Bodies up to this size (a few dozen rows, about a millisecond of work) are imputed on
#: the event loop; larger ones in a worker thread, so that they do not hold up the small
#: ones (the engine serialises the imputation itself either way).
INLINE_BYTES = 8192


class _Refused(Exception):
    """A request refused before imputation: HTTP status and JSON body."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body.get("error"))
        self.status, self.body = status, body


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) past ``limit`` bytes before it is all read."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _Refused(413, {"error": f"body of {declared} bytes; at most {limit} "
                                      "(max_body_bytes)"})
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _Refused(413, {"error": f"body over {limit} bytes (max_body_bytes)"})
        chunks.append(chunk)
    return b"".join(chunks)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON (send null for a missing cell)")


def _parse(state: ServiceState, body: bytes, content_type: str) -> np.ndarray:
    """The request's rows (JSON records or CSV), or a :class:`DataError`."""
    schema, max_rows = state.site.schema, state.site.config.serve.max_rows
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(SOURCE, "the body is not UTF-8 text") from None
    if content_type == "text/csv":
        return rows_from_csv(text, schema, max_rows)
    try:
        document = json.loads(text, parse_constant=_refuse_constant)
    except ValueError as exc:
        raise DataError(SOURCE, f"not valid JSON (line {getattr(exc, 'lineno', '?')})") \
            from None
    return rows_from_json(document, schema, max_rows)


def _cell(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _labeller(levels: tuple[str | float, ...] | None) -> Callable[[float], Any]:
    """A column's cell as the response gives it: a number, or a coded column's code as
    its declared level (the label the request sent: text, or a number)."""
    if levels is None:
        return _cell
    labels = [level if isinstance(level, str) else float(level) for level in levels]
    return lambda code: labels[int(code)] if math.isfinite(code) else None


def _imputed_cell(outcome: ImputeOutcome, i: int, j: int, label: Callable[[float], Any]
                  ) -> dict[str, Any]:
    """An imputed cell: value, method, uncertainty, for a voted level its probability, and
    the request's draws of it."""
    result = outcome.result
    cell: dict[str, Any] = {"value": label(result.values[i, j]),
                            "method": str(result.method[i, j]),
                            "uncertainty": _cell(result.uncertainty[i, j])}
    if result.probability is not None and math.isfinite(result.probability[i, j]):
        cell["probability"] = float(result.probability[i, j])
    if outcome.draws:
        cell["draws"] = [label(drawn.values[i, j]) for drawn in outcome.draws]
    return cell


def _response(state: ServiceState, outcome: ImputeOutcome) -> dict[str, Any]:
    """The completed rows (coded columns as their declared levels), each imputed cell
    with its value, method and uncertainty."""
    result, columns = outcome.result, state.site.columns
    labels = [_labeller(spec.levels) for spec in state.site.schema.columns]
    rows = []
    for i in range(result.values.shape[0]):
        imputed = {columns[j]: _imputed_cell(outcome, i, j, labels[j])
                   for j in np.flatnonzero(result.imputed[i])}
        rows.append({"values": {c: label(v) for c, label, v in zip(
                         columns, labels, result.values[i], strict=True)},
                     "imputed": imputed})
    signed = state.site.signed
    return {"columns": columns, "rows": rows,
            "summary": {"rows": len(rows), "cells_imputed": sum(outcome.methods.values()),
                        "by_method": outcome.methods,
                        "fallback_rate": outcome.fallback_rate},
            "bank": {"run_id": signed.run_id, "key_id": signed.key_id,
                     "saved_at": signed.saved_at.isoformat()}}


def _requested_draws(request: Request) -> int:
    """The ``draws`` query parameter (0 when absent), or a 422 refusal."""
    text = request.query_params.get("draws")
    if text is None:
        return 0
    if not text.isdigit() or not 2 <= int(text) <= MAX_DRAWS:
        raise _Refused(422, {"error": f"draws: expected an integer from 2 to {MAX_DRAWS} "
                                      "(the completed copies to pool with Rubin's rules)"})
    return int(text)


def _impute(state: ServiceState, body: bytes, content_type: str, n_draws: int = 0
            ) -> tuple[ImputeOutcome, bytes, int]:
    """Parse, impute (and draw ``n_draws`` copies), encode (in a worker thread): the
    outcome, JSON bytes and row count."""
    try:
        x = _parse(state, body, content_type)
    except DataError as exc:
        column = exc.column if exc.column in state.site.columns else (
            None if exc.column is None else "an unknown column")
        status = 413 if isinstance(exc, RequestTooLarge) else 422
        log.info("refused an imputation request (%d): row %s, column %s", status, exc.row,
                 column)
        raise _Refused(status, {"error": str(exc), "row": exc.row,
                                "column": exc.column}) from None
    try:
        outcome = state.impute(x, n_draws)
    except ValueError as exc:  # the site cannot draw (local mode with coded columns)
        raise _Refused(422, {"error": f"draws: {exc}"}) from None
    return outcome, json.dumps(_response(state, outcome)).encode("utf-8"), len(x)


def _unauthorized(basic: bool) -> Response:
    challenge = 'Basic realm="fediim status"' if basic else 'Bearer realm="fediim"'
    return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401,
                        headers={"WWW-Authenticate": challenge})


def create_app(state: ServiceState, token: str | None) -> FastAPI:
    """The service over ``state``; ``token`` None only on a loopback address."""
    app = FastAPI(title="fediim serve", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = ServiceMetrics(state)
    limit = state.site.config.serve.max_body_bytes

    @app.get("/healthz")
    def healthz() -> Response:
        stale = state.bank_is_stale()
        body = {"status": "stale" if stale else "ok", "bank_run_id": state.site.signed.run_id,
                "bank_age_days": round(state.bank_age_days(), 3)}
        return JSONResponse(body, status_code=503 if stale else 200)

    @app.get("/metrics")
    def prometheus(request: Request) -> Response:
        if not authorized(request.headers.get("authorization"), token):
            return _unauthorized(basic=False)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    def status_page(request: Request) -> Response:
        if not authorized(request.headers.get("authorization"), token, allow_basic=True):
            return _unauthorized(basic=True)
        return HTMLResponse(render_status(state))

    @app.post("/v1/impute")
    async def impute(request: Request) -> Response:
        started = time.perf_counter()
        if not authorized(request.headers.get("authorization"), token):
            return _unauthorized(basic=False)
        outcome, n_rows = None, 0
        try:
            content_type = request.headers.get("content-type", "application/json")
            content_type = content_type.split(";")[0].strip().lower()
            if content_type not in ("application/json", "text/csv"):
                raise _Refused(415, {"error": "send application/json or text/csv"})
            if state.bank_is_stale():
                raise _Refused(503, {"error": "the bank is stale (older than "
                                              "max_bank_age_days); join a new federation run"})
            n_draws = _requested_draws(request)
            body = await _read_body(request, limit)
            if len(body) <= INLINE_BYTES and not n_draws:  # a thread hand-off costs more
                outcome, payload, n_rows = _impute(state, body, content_type)
            else:
                outcome, payload, n_rows = await run_in_threadpool(_impute, state, body,
                                                                   content_type, n_draws)
            response: Response = Response(payload, media_type="application/json")
        except _Refused as refused:
            response = JSONResponse(refused.body, status_code=refused.status)
        seconds = time.perf_counter() - started
        metrics.observe(response.status_code, seconds, n_rows, outcome)
        state.record(outcome, n_rows, seconds)
        return response

    return app
