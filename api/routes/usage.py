"""`POST /api/v1/meter/usage`: usage after the fact, in batches (streamed completions, log
shippers). Service key with the `meter` scope.

Each event names the account, its own idempotency key, and what was used: a provider usage
object (OpenAI's or Anthropic's shape, see meter/usage.py) or a plain `tokens` count. With a
`hold_id` the event settles that hold; without, it is recorded as usage (`Meter.record_usage`),
which the per-request maximum and the daily and minute limits never refuse: they bound what may
be asked, not what was used. What the balance cannot cover is reported as uncollected.

Every event gets its own result, in order, so one bad event does not hold up the others, and a
shipper may resend the whole batch (or only the failed events) with the same keys: each event is
charged once. The answer is 200 when every event was answered (recorded, replayed or refused
for its own input); 503 with Retry-After, still with every result, when some could not reach the
token store, so a shipper that only reads the status resends the batch.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field, ValidationError

from api.deps import service_with_scope
from api.errors import error_body
from api.fields import StrictInt
from api.metering import json_response, observe
from api.routes.meter import AccountId, _parse
from api.state import AppState
from meter import InvalidInput, Meter, MeterError, Receipt
from meter._catalog import Catalog
from meter._http import error_parts, process_time
from meter.usage import Usage, parse_usage

router = APIRouter(prefix="/api/v1/meter", tags=["meter"])
MAX_EVENTS = 1_000
MAX_BODY_BYTES = 2_097_152  # 1,000 events of up to ~2 KB each
IN_FLIGHT = 64  # meter calls of one batch running at once (each is one Redis script)


class UsageEvent(BaseModel):
    account_id: AccountId
    idempotency_key: str = Field(min_length=1, max_length=255, description="charged once per key and account")
    usage: dict[str, Any] | None = Field(default=None, description="an OpenAI or Anthropic usage object")
    tokens: StrictInt | None = Field(default=None, ge=0, description="instead of usage: the tokens used")
    hold_id: str | None = Field(default=None, max_length=20, description="settle this hold with the usage")
    model: str | None = Field(default=None, max_length=64, examples=["gpt-4o-mini"])
    agent: str | None = Field(default=None, max_length=64)
    project_id: str | None = Field(default=None, max_length=128)


class UsageBatch(BaseModel):
    events: list[Any] = Field(min_length=1, max_length=MAX_EVENTS)  # each validated on its own


_EVENT_SCHEMA = UsageEvent.model_json_schema(ref_template="#/components/schemas/{model}")
_DOC = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["events"],
    "properties": {"events": {"type": "array", "minItems": 1, "maxItems": MAX_EVENTS, "items": _EVENT_SCHEMA}}}}}}}


def _field(error: Any, index: int) -> str:
    parts = [str(p) for p in error.get("loc", ())]
    return ".".join([f"events.{index}", *parts])


def _failure(index: int, status: int, body: dict[str, Any]) -> dict[str, Any]:
    return {"index": index, "ok": False, "status": status, **body}


async def _charge(meter: Meter, catalog: Catalog, index: int, raw: object) -> dict[str, Any]:
    """One event's result: charged (or replayed), or the error it would have had alone."""
    try:
        event = UsageEvent.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = _field(first, index)
        return _failure(index, 422, error_body("invalid_input", f"{field}: {first.get('msg', 'invalid')}",
                                               field=field))
    try:
        usage = _usage(event, index)
        tokens = usage.total if usage is not None else event.tokens or 0
        inp, out = (usage.input_tokens, usage.output_tokens) if usage else (None, None)
        r: Receipt
        if event.hold_id is not None:
            r = await meter.settle(event.account_id, event.hold_id, tokens, request_id=event.idempotency_key,
                                   agent=event.agent, model=event.model, project_id=event.project_id,
                                   input_tokens=inp, output_tokens=out)
        else:
            r = await meter.record_usage(event.account_id, tokens, request_id=event.idempotency_key,
                                         agent=event.agent, model=event.model, project_id=event.project_id,
                                         input_tokens=inp, output_tokens=out)
    except MeterError as exc:
        if isinstance(exc, InvalidInput) and not exc.field.startswith("events."):
            exc = InvalidInput(f"events.{index}.{exc.field}", exc.message)
        status, body, _ = error_parts(exc)
        return _failure(index, status, body)
    priced = catalog.is_priced(event.model)
    cost = catalog.cost_usd_micros(event.model, usage.input_tokens, usage.output_tokens, usage.cached_tokens) \
        if priced and usage is not None and event.model else 0
    return {"index": index, "ok": True, "transaction_id": r.transaction_id, "tokens": tokens,
            "charged_tokens": r.charged, "uncollected_tokens": r.uncollected, "remaining_tokens": r.remaining,
            "replayed": r.replayed, "cost_usd_micros": cost, "priced": priced}


def _usage(event: UsageEvent, index: int) -> Usage | None:
    if (event.usage is None) == (event.tokens is None):
        raise InvalidInput(f"events.{index}.usage", "send a usage object or a tokens count (one of them)")
    if event.usage is None:
        return None
    return parse_usage(event.usage, f"events.{index}.usage")


@router.post("/usage", summary="Record usage after the fact: up to 1,000 events, each charged once",
             openapi_extra=_DOC)
async def record_usage(request: Request) -> Response:
    start = time.perf_counter()
    await service_with_scope(request, "meter")
    state: AppState = request.app.state.tm
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        return json_response(413, error_body("payload_too_large", f"a usage batch is at most {MAX_BODY_BYTES} bytes",
                                             field="body"), [process_time(start)])
    batch = _parse(UsageBatch, raw)
    meter, catalog = state.rt.meter, state.rt.catalog
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(index: int, event: object) -> dict[str, Any]:
        async with gate:
            return await _charge(meter, catalog, index, event)

    results = await asyncio.gather(*(one(i, e) for i, e in enumerate(batch.events)))
    failed = sum(1 for r in results if not r["ok"])
    retry = any(r["status"] >= 500 for r in results if not r["ok"])
    observe("usage", "ok" if not failed else "store_unavailable" if retry else "partial", start)
    new = [r for r in results if r["ok"] and not r["replayed"]]  # the totals: what this request changed
    body = {"results": results, "recorded": len(results) - failed, "failed": failed,
            "charged_tokens": sum(r["charged_tokens"] for r in new),
            "uncollected_tokens": sum(r["uncollected_tokens"] for r in new)}
    if retry:  # some events could not reach the store: resend the batch (the rest replay)
        return json_response(503, body, [(b"retry-after", b"1"), process_time(start)])
    return json_response(200, body, [process_time(start)])
