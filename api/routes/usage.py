"""`POST /api/v1/meter/usage`: usage reported after the fact (streamed calls, log shippers), up
to 1,000 events per call, each charged exactly once (its idempotency key), with a result per
event. The call already happened, so actual usage is always recorded: the per-request maximum
and the daily cap limit what may be asked, not what was used; what the balance cannot cover is
reported as `uncollected_tokens`, never a negative balance. An event with a `hold_id` settles
that hold instead."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field, ValidationError

from api.deps import service_with_scope
from api.metering import json_response, observe
from api.routes.meter import AccountId, _doc, _parse
from api.state import AppState
from meter import InvalidInput, MeterError, Receipt
from meter._http import error_parts, field_names, process_time
from meter.usage import parse_usage

router = APIRouter(prefix="/api/v1/meter", tags=["meter"])
MAX_EVENTS = 1_000
MAX_BODY_BYTES = 2 * 1024 * 1024  # 1,000 events of ~2 KiB; api/app.py raises the global cap for this path
CONCURRENCY = 64  # events in flight at once: the store pipelines them per loop tick


class UsageEvent(BaseModel):
    account_id: AccountId
    idempotency_key: str = Field(min_length=1, max_length=255, description="charged once per key")
    model: str | None = Field(default=None, max_length=64, examples=["gpt-4o-mini-2024-07-18"])
    agent: str | None = Field(default=None, max_length=64)
    project_id: str | None = Field(default=None, max_length=128)
    usage: dict[str, Any] = Field(description="an OpenAI (prompt_tokens, completion_tokens, ...) or Anthropic "
                                              "(input_tokens, output_tokens, cache_*) usage object")
    hold_id: str | None = Field(default=None, max_length=20, description="settle this hold with the usage")


class UsageIn(BaseModel):
    events: list[Any] = Field(min_length=1, max_length=MAX_EVENTS,
                                         description="each a UsageEvent; a bad one fails alone")


def _invalid(index: int, field: str, message: str) -> dict[str, Any]:
    return {"index": index, "ok": False, "error": "invalid_input", "field": field, "message": f"{field}: {message}"}


async def _charge(state: AppState, index: int, raw: object) -> dict[str, Any]:
    try:
        event = UsageEvent.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ())) or "event"
        return _invalid(index, field, str(first.get("msg", "invalid")))
    meter = state.rt.meter
    try:
        usage = parse_usage(event.usage)
        labels = {"agent": event.agent, "model": event.model, "project_id": event.project_id}
        with field_names(request_id="idempotency_key"):
            r: Receipt
            if event.hold_id is not None:
                r = await meter.settle(event.account_id, event.hold_id, usage.total, request_id=event.idempotency_key,
                                       input_tokens=usage.input_tokens, output_tokens=usage.output_tokens, **labels)
            else:
                r = await meter.record_usage(event.account_id, usage.total, request_id=event.idempotency_key,
                                             input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
                                             **labels)
    except InvalidInput as exc:
        return _invalid(index, exc.field, exc.message)
    except MeterError as exc:
        status, body, _ = error_parts(exc)
        return {"index": index, "ok": False, "status": status, **body}
    return {"index": index, "ok": True, "transaction_id": r.transaction_id, "charged_tokens": r.charged,
            "uncollected_tokens": r.uncollected, "remaining_tokens": r.remaining, "replayed": r.replayed,
            "usage": {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
                      "cached_tokens": usage.cached_tokens}}


@router.post("/usage", summary="Usage after the fact: up to 1,000 events, each charged once",
             openapi_extra=_doc(UsageIn, idempotent=False))
async def record_usage(request: Request) -> Response:
    start = time.perf_counter()
    await service_with_scope(request, "meter")
    state: AppState = request.app.state.tm
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        return json_response(413, {"error": "payload_too_large", "field": "body",
                                   "message": f"a usage batch is at most {MAX_BODY_BYTES} bytes"},
                             [process_time(start)])
    body = _parse(UsageIn, raw)
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(index: int, event: object) -> dict[str, Any]:
        async with gate:
            return await _charge(state, index, event)

    results = await asyncio.gather(*(one(i, e) for i, e in enumerate(body.events)))
    failed = sum(not r["ok"] for r in results)
    observe("usage", "ok" if not failed else "partial", start)
    summary = {"events": len(results), "charged": len(results) - failed, "failed": failed,
               "charged_tokens": sum(r.get("charged_tokens", 0) for r in results),
               "uncollected_tokens": sum(r.get("uncollected_tokens", 0) for r in results)}
    return json_response(200, {**summary, "results": results}, [process_time(start)])
