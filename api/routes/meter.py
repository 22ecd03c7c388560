"""Meter endpoints for API gateways (service key with the `meter` scope). The hot path: one
Redis script per call, no database. Handlers take the raw request: the key and the
Idempotency-Key are read from the headers and the body is validated by its pydantic model
directly (`model_validate_json`), skipping FastAPI's per-request dependency resolution, which
cost more than the meter call itself. The OpenAPI schema still documents bodies and headers."""

from __future__ import annotations

import time
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError

from api.deps import authorize, service_with_scope
from api.errors import error_body, field_names
from api.fields import StrictInt
from api.metering import decision_response, json_response, metered_headers, observe
from api.state import AppState
from meter import Decision, MeterError
from meter._http import error_parts, process_time

router = APIRouter(prefix="/api/v1/meter", tags=["meter"])
MAX_BODY_BYTES = 16_384  # a debit body is a few hundred bytes; its text fields are capped far below this
M = TypeVar("M", bound=BaseModel)

AccountId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:@-]+$",
                                 examples=["user-42"])]
_IDEMPOTENCY_DOC = {"name": "Idempotency-Key", "in": "header", "required": False,
                    "description": "retries with the same key are charged once (TOKENMETER_IDEMPOTENCY_TTL_S: 24 h)",
                    "schema": {"type": "string", "maxLength": 255}}


def _doc(model: type[BaseModel], idempotent: bool = True) -> dict[str, Any]:
    """OpenAPI for a hand-parsed body (and the Idempotency-Key header)."""
    extra: dict[str, Any] = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": model.model_json_schema(ref_template="#/components/schemas/{model}")}}}}
    if idempotent:
        extra["parameters"] = [_IDEMPOTENCY_DOC]
    return extra


async def _begin(request: Request, model: type[M]) -> tuple[AppState, M, str | None]:
    """Authorize (meter scope), then parse and validate the body; 401/403/422 as elsewhere."""
    await service_with_scope(request, "meter")
    return request.app.state.tm, _parse(model, await request.body()), request.headers.get("idempotency-key")


def _parse(model: type[M], raw: bytes) -> M:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


class DebitIn(BaseModel):
    account_id: AccountId
    tokens: StrictInt = Field(gt=0, examples=[2000], description="at most the plan's per-request maximum (8,192)")
    agent: str | None = Field(default=None, max_length=64, examples=["code"])
    model: str | None = Field(default=None, max_length=64, examples=["sonnet"])
    input_tokens: StrictInt | None = Field(default=None, ge=0)
    output_tokens: StrictInt | None = Field(default=None, ge=0)
    project_id: str | None = Field(default=None, max_length=128)


class ReserveIn(BaseModel):
    account_id: AccountId
    tokens: StrictInt = Field(gt=0, examples=[5000])
    ttl_ms: StrictInt | None = Field(default=None, gt=0, le=86_400_000, description="hold lifetime")
    agent: str | None = Field(default=None, max_length=64)
    model: str | None = Field(default=None, max_length=64)
    project_id: str | None = Field(default=None, max_length=128)


class SettleIn(BaseModel):
    account_id: AccountId
    hold_id: str = Field(max_length=20, examples=["17"])
    actual_tokens: StrictInt = Field(ge=0, examples=[4210])
    agent: str | None = Field(default=None, max_length=64)
    model: str | None = Field(default=None, max_length=64)
    input_tokens: StrictInt | None = Field(default=None, ge=0)
    output_tokens: StrictInt | None = Field(default=None, ge=0)
    project_id: str | None = Field(default=None, max_length=128)


class ReleaseIn(BaseModel):
    account_id: AccountId
    hold_id: str = Field(max_length=20)


class OpenIn(BaseModel):
    account_id: AccountId
    plan: str = Field(default="free", max_length=32, examples=["free"])


def decision_body(d: Decision) -> dict[str, object]:
    return {"allowed": d.allowed, "remaining_tokens": d.remaining, "requests_today": d.requests_today,
            "daily_request_limit": d.daily_request_limit, "transaction_id": d.transaction_id,
            "replayed": d.replayed, "reserved_tokens": d.reserved, "tokens_used_today": d.tokens_used_today}


async def debit_decision(state: AppState, authorization: str | None, x_api_key: str | None,
                         idempotency_key: str | None, raw: bytes) -> Decision:
    """The debit itself, shared by the route below and the pure-ASGI fast path (api/fastpath.py):
    body size (413), key with the meter scope (401/403), body (422), one meter call."""
    if len(raw) > MAX_BODY_BYTES:
        raise HTTPException(413, detail=error_body(
            "payload_too_large", f"a debit body is at most {MAX_BODY_BYTES} bytes", field="body"))
    await authorize(state, authorization, x_api_key, "meter")
    body = _parse(DebitIn, raw)
    with field_names(request_id="Idempotency-Key"):
        return await state.rt.meter.debit(body.account_id, body.tokens, agent=body.agent, model=body.model,
                                          request_id=idempotency_key, input_tokens=body.input_tokens,
                                          output_tokens=body.output_tokens, project_id=body.project_id)


@router.post("/debit", summary="May this account spend N tokens now? If so, deduct them.",
             openapi_extra=_doc(DebitIn),
             responses={402: {"description": "insufficient tokens"}, 429: {"description": "daily cap or rate limit"}})
async def debit(request: Request) -> Response:
    """Served by api/fastpath.py in the app; this route documents it and serves it when the
    fast path is not mounted."""
    start = time.perf_counter()
    h = request.headers
    state: AppState = request.app.state.tm
    try:
        d = await debit_decision(state, h.get("authorization"), h.get("x-api-key"), h.get("idempotency-key"),
                                 await request.body())
    except MeterError as exc:  # as the fast path answers it (with X-Process-Time), not the generic handler
        status, body, headers = error_parts(exc)
        observe("debit", str(body["error"]), start)
        return json_response(status, body, [*headers, process_time(start)])
    observe("debit", d.reason, start)
    return decision_response(state.rt.meter, d, decision_body(d), start)


@router.post("/reserve", summary="Hold tokens for a call whose cost is known afterwards",
             openapi_extra=_doc(ReserveIn))
async def reserve(request: Request) -> Response:
    start = time.perf_counter()
    state, body, idempotency_key = await _begin(request, ReserveIn)
    with field_names(request_id="Idempotency-Key"):
        d = await state.rt.meter.reserve(body.account_id, body.tokens, ttl_ms=body.ttl_ms, agent=body.agent,
                                         model=body.model, request_id=idempotency_key, project_id=body.project_id)
    observe("reserve", d.reason, start)
    body_out = {**decision_body(d), "hold_id": d.hold_id, "expires_at_ms": d.expires_at_ms}
    return decision_response(state.rt.meter, d, body_out, start)


@router.post("/settle", summary="Charge a hold's actual usage and return the rest", openapi_extra=_doc(SettleIn))
async def settle(request: Request) -> Response:
    start = time.perf_counter()
    state, body, idempotency_key = await _begin(request, SettleIn)
    with field_names(request_id="Idempotency-Key"):
        r = await state.rt.meter.settle(body.account_id, body.hold_id, body.actual_tokens, agent=body.agent,
                                        model=body.model, request_id=idempotency_key,
                                        input_tokens=body.input_tokens, output_tokens=body.output_tokens,
                                        project_id=body.project_id)
    content = {"transaction_id": r.transaction_id, "charged_tokens": r.charged,
               "uncollected_tokens": r.uncollected, "remaining_tokens": r.remaining,
               "reserved_tokens": r.reserved, "replayed": r.replayed}
    observe("settle", "ok", start)
    return json_response(200, content, metered_headers(r.remaining, None, None, start))


@router.post("/release", summary="Cancel a hold; its tokens go back", openapi_extra=_doc(ReleaseIn))
async def release(request: Request) -> Response:
    start = time.perf_counter()
    state, body, idempotency_key = await _begin(request, ReleaseIn)
    with field_names(request_id="Idempotency-Key"):
        r = await state.rt.meter.release(body.account_id, body.hold_id, request_id=idempotency_key)
    content = {"transaction_id": r.transaction_id, "released_tokens": r.tokens,
               "remaining_tokens": r.remaining, "reserved_tokens": r.reserved, "replayed": r.replayed}
    observe("release", "ok", start)
    return json_response(200, content, metered_headers(r.remaining, None, None, start))


@router.get("/accounts/{account_id}/balance", summary="An account's live balance (the user balance fields)")
async def account_balance(account_id: AccountId, request: Request) -> Response:
    start = time.perf_counter()
    await service_with_scope(request, "meter")
    state: AppState = request.app.state.tm
    b = await state.rt.meter.balance(account_id)
    return json_response(200, b.as_dict(), metered_headers(b.remaining_tokens, b.tokens_used_today,
                                                           b.requests_today, start))


@router.post("/accounts", status_code=201, summary="Open an account for a gateway's user",
             openapi_extra=_doc(OpenIn, idempotent=False))
async def open_account(request: Request) -> JSONResponse:
    principal = await service_with_scope(request, "meter")
    state: AppState = request.app.state.tm
    body = _parse(OpenIn, await request.body())
    plan = state.rt.catalog.plans.get(body.plan)
    if plan is not None and plan.price_inr_paise > 0 and "admin" not in principal.scopes \
            and not state.rt.settings.meter_open_paid_plans:  # a paid plan is for admins (or when allowed)
        raise HTTPException(403, detail=error_body(
            "forbidden", f"opening an account on the paid plan {body.plan!r} needs the 'admin' scope",
            field="plan"))
    created = await state.rt.meter.open_account(body.account_id, plan=body.plan)
    b = await state.rt.meter.balance(body.account_id)
    return JSONResponse(status_code=201 if created else 200, content={"created": created, **b.as_dict()})
