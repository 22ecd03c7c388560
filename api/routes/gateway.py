"""Endpoints for API gateways that cannot send a JSON body: nginx `auth_request`, Traefik
`forwardAuth`, Envoy `ext_authz` (HTTP). Everything comes in headers (docs/GATEWAYS.md):

    X-Tokenmeter-Key          the service key (or `Authorization: Bearer <service key>`, or X-API-Key)
    X-Tokenmeter-Account      the account to charge; or a tokenmeter user token in Authorization
    X-Tokenmeter-Tokens       tokens asked (check) or used (settle); default TOKENMETER_GATEWAY_DEFAULT_TOKENS
    X-Tokenmeter-Model / -Agent / -Project   labels recorded with the change
    X-Tokenmeter-Mode         debit (default) | reserve
    X-Tokenmeter-Hold         the hold to settle or release (or in the path)
    X-Tokenmeter-Deny-Status  403: answer every refusal with 403 + X-Tokenmeter-Reason (nginx
                              auth_request only understands 2xx, 401 and 403)
    Idempotency-Key           (or X-Request-Id): a retry is charged once; scoped by operation

The check answers any method (gateways forward the client's), with no body, and under any path
suffix (Envoy appends the client's path to the check path). Its answer: 200 with the decision in
headers, or 402/429 with the brief's body and Retry-After, or (Deny-Status 403) 403.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response

from api.deps import _bearer, _unauthorized, authenticate_service, current_user
from api.metering import json_response, metered_headers, observe
from api.routes.meter import decision_body
from api.security import read_token
from api.state import AppState
from meter import Decision, InvalidInput, MeterError, Receipt
from meter._http import Header, decision_parts, error_body, error_parts, field_names, process_time
from meter.usage import Usage, parse_usage

router = APIRouter(prefix="/api/v1/gateway", tags=["gateway"])
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
MAX_USAGE_BODY = 1_048_576  # a whole non-streamed completion may be posted; its `usage` is read
_DIGITS = re.compile(r"[0-9]{1,16}")
_NAMES = {"account_id": "X-Tokenmeter-Account", "tokens": "X-Tokenmeter-Tokens", "agent": "X-Tokenmeter-Agent",
          "model": "X-Tokenmeter-Model", "project_id": "X-Tokenmeter-Project", "request_id": "Idempotency-Key",
          "hold_id": "X-Tokenmeter-Hold", "actual_tokens": "X-Tokenmeter-Tokens", "ttl_ms": "X-Tokenmeter-Hold-Ttl-Ms"}
_DENY_REASON = {404: "unknown_account", 409: "idempotency_conflict", 422: "invalid_request"}


async def _account(request: Request, state: AppState) -> str:
    h = request.headers
    return await charged_account(request, state, key=h.get("x-tokenmeter-key") or h.get("x-api-key"),
                                 authorization=h.get("authorization"), named=h.get("x-tokenmeter-account"))


async def charged_account(request: Request, state: AppState, *, key: str | None, authorization: str | None,
                          named: str | None) -> str:
    """Who is charged. A service key with the meter scope names the account in
    X-Tokenmeter-Account (or passes the user's token along); a user token alone charges its own
    account. (The gateway check and the metering proxy, api/proxy.py.)"""
    bearer = _bearer(authorization)
    user = read_token(state.jwt_secret, bearer) if bearer else None
    if user is not None and not key:
        if named is not None and named != user:
            raise HTTPException(403, detail=error_body(
                "forbidden", "a user token charges its own account only", field="X-Tokenmeter-Account"))
        return await current_user(request, authorization, state)
    principal = await authenticate_service(state, key or bearer)
    if "meter" not in principal.scopes:
        raise HTTPException(403, detail=error_body("forbidden", "this key lacks the 'meter' scope"))
    if named is not None:
        return named
    if user is not None:
        return await current_user(request, authorization, state)
    raise _unauthorized("no account: send X-Tokenmeter-Account, or the user's token in Authorization")


def _int_header(request: Request, name: str, default: int | None = None, *, low: int = 1) -> int | None:
    raw = request.headers.get(name)
    if raw is None:
        return default
    if not _DIGITS.fullmatch(raw.strip()):
        raise InvalidInput(name, "must be a whole number of digits")
    value = int(raw)
    if value < low:
        raise InvalidInput(name, f"must be at least {low}")
    return value


def _choice(request: Request, name: str, allowed: tuple[str, ...]) -> str:
    raw = request.headers.get(name)
    if raw is None:
        return allowed[0]
    value = raw.strip().lower()
    if value not in allowed:
        raise InvalidInput(name, f"must be one of {', '.join(allowed)}")
    return value


def _labels(request: Request) -> dict[str, str | None]:
    h = request.headers
    return {"agent": h.get("x-tokenmeter-agent"), "model": h.get("x-tokenmeter-model"),
            "project_id": h.get("x-tokenmeter-project")}


def _idempotency_key(request: Request) -> str | None:
    h = request.headers
    return h.get("idempotency-key") or h.get("x-request-id")


def _decision_headers(d: Decision) -> list[Header]:
    out: list[Header] = []
    if d.transaction_id:
        out.append((b"x-tokenmeter-transaction", d.transaction_id.encode()))
    if d.hold_id:
        out += [(b"x-tokenmeter-hold", d.hold_id.encode()),
                (b"x-tokenmeter-hold-expires-ms", b"%d" % (d.expires_at_ms or 0))]
    if not d.allowed:
        out.append((b"x-tokenmeter-reason", d.reason.encode()))
        if d.reason == "insufficient":
            out += [(b"x-tokenmeter-required", b"%d" % d.tokens), (b"x-tokenmeter-available", b"%d" % d.remaining),
                    (b"x-tokenmeter-shortage", b"%d" % d.shortage)]
    return out


def _refusal(status: int, body: dict[str, Any], headers: list[Header], deny_403: bool,
             start: float) -> Response:
    """A refusal as given, or (Deny-Status 403) as a 403 with the reason in a header; 401 and 503
    stay (nginx passes 401 on; a 503 becomes its error page: fail closed)."""
    if deny_403 and status not in (401, 403, 503):
        reason = str(body.get("reason") or _DENY_REASON.get(status) or "insufficient")
        headers = [*headers, (b"x-tokenmeter-reason", reason.encode())] \
            if not any(n == b"x-tokenmeter-reason" for n, _ in headers) else headers
        if "message" in body:
            message = str(body["message"]).replace('"', "'").replace("\\", "/")  # safe inside a JSON string
            headers.append((b"x-tokenmeter-message", message.encode("ascii", "replace")[:200]))
        status = 403
    return json_response(status, body, [*headers, process_time(start)])


@router.api_route("/check", methods=["GET"], summary="May this request spend N tokens? Headers in, headers out "
                                                   "(any method; any path suffix)")
@router.api_route("/check", methods=METHODS[1:], include_in_schema=False)  # one documented operation
@router.api_route("/check/{forwarded_path:path}", methods=METHODS, include_in_schema=False)
async def check(request: Request) -> Response:
    start = time.perf_counter()
    state: AppState = request.app.state.tm
    meter = state.rt.meter
    deny_403 = request.headers.get("x-tokenmeter-deny-status", "").strip() == "403"
    mode = "debit"
    try:
        with field_names(**_NAMES):
            mode = _choice(request, "X-Tokenmeter-Mode", ("debit", "reserve"))
            if request.headers.get("x-tokenmeter-deny-status", "403").strip() not in ("403", "402"):
                raise InvalidInput("X-Tokenmeter-Deny-Status", "must be 403 (or 402, the default)")
            account = await _account(request, state)
            tokens = _int_header(request, "X-Tokenmeter-Tokens") or state.rt.settings.gateway_default_tokens
            labels = _labels(request)
            key = _idempotency_key(request)
            if mode == "reserve":
                ttl = _int_header(request, "X-Tokenmeter-Hold-Ttl-Ms")
                d = await meter.reserve(account, tokens, ttl_ms=ttl, request_id=key, **labels)
            else:
                d = await meter.debit(account, tokens, request_id=key, agent=labels["agent"], model=labels["model"],
                                      project_id=labels["project_id"])
    except HTTPException as exc:
        detail = exc.detail if isinstance(exc.detail, dict) else error_body("error", str(exc.detail))
        observe(f"gateway_{mode}", str(detail.get("error")), start)
        return _refusal(exc.status_code, detail, [(k.lower().encode(), v.encode()) for k, v in
                                                  (exc.headers or {}).items()], deny_403, start)
    except MeterError as exc:
        status, body, headers = error_parts(exc)
        observe(f"gateway_{mode}", str(body["error"]), start)
        return _refusal(status, body, headers, deny_403, start)
    observe(f"gateway_{mode}", d.reason, start)
    body = decision_body(d)
    if d.hold_id:
        body = {**body, "hold_id": d.hold_id, "expires_at_ms": d.expires_at_ms}
    status, content, headers = decision_parts(d, body, meter.clock.now_ms())
    headers = [*headers, *_decision_headers(d)]
    if status == 200:
        return json_response(200, content, [*headers, process_time(start)])
    return _refusal(status, content, headers, deny_403, start)


async def _usage_from_body(request: Request) -> tuple[Usage | None, str | None]:
    """The usage object of the body (OpenAI or Anthropic, or a whole response), and the model it names."""
    raw = await request.body()
    if not raw.strip():
        return None, None
    if len(raw) > MAX_USAGE_BODY:
        raise InvalidInput("body", f"at most {MAX_USAGE_BODY} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidInput("body", "must be JSON: a usage object or a response holding one") from None
    model = data.get("model") if isinstance(data, dict) else None
    return parse_usage(data), model if isinstance(model, str) else None


def _hold(request: Request, hold_id: str | None) -> str:
    hold = hold_id or request.headers.get("x-tokenmeter-hold")
    if not hold:
        raise InvalidInput("X-Tokenmeter-Hold", "the hold id of the reserve (header or path) is required")
    return hold


def _receipt(r: Receipt, start: float, **extra: object) -> Response:
    body = {"transaction_id": r.transaction_id, "remaining_tokens": r.remaining, "reserved_tokens": r.reserved,
            "replayed": r.replayed, **extra}
    headers = [*metered_headers(r.remaining, None, None, start)[:-1],
               (b"x-tokenmeter-transaction", r.transaction_id.encode()), process_time(start)]
    return json_response(200, body, headers)


@router.post("/settle", summary="Charge a hold: actual tokens in a header, or a usage object as the body")
@router.post("/settle/{hold_id}", summary="Charge a hold named in the path")
async def settle(request: Request, hold_id: str | None = None) -> Response:
    start = time.perf_counter()
    state: AppState = request.app.state.tm
    with field_names(**_NAMES):
        account = await _account(request, state)
        hold = _hold(request, hold_id)
        usage, body_model = await _usage_from_body(request)
        actual = _int_header(request, "X-Tokenmeter-Tokens", low=0)
        if actual is None and usage is None:
            raise InvalidInput("X-Tokenmeter-Tokens", "send the actual tokens in this header, or a usage object "
                                                      "(OpenAI or Anthropic) as the body")
        labels = _labels(request)
        labels["model"] = labels["model"] or body_model
        r = await state.rt.meter.settle(
            account, hold, actual if actual is not None else usage.total if usage else 0,
            request_id=_idempotency_key(request), input_tokens=usage.input_tokens if usage else None,
            output_tokens=usage.output_tokens if usage else None, **labels)
    observe("gateway_settle", "ok", start)
    return _receipt(r, start, charged_tokens=r.charged, uncollected_tokens=r.uncollected)


@router.post("/release", summary="Cancel a hold named in X-Tokenmeter-Hold; its tokens go back")
@router.post("/release/{hold_id}", summary="Cancel a hold named in the path")
async def release(request: Request, hold_id: str | None = None) -> Response:
    start = time.perf_counter()
    state: AppState = request.app.state.tm
    with field_names(**_NAMES):
        account = await _account(request, state)
        r = await state.rt.meter.release(account, _hold(request, hold_id), request_id=_idempotency_key(request))
    observe("gateway_release", "ok", start)
    return _receipt(r, start, released_tokens=r.tokens)
