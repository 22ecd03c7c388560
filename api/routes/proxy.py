"""The metering proxy: OpenAI- and Anthropic-compatible routes in front of the configured
upstreams (docs/PROXY.md). Mounted only when TOKENMETER_UPSTREAM_OPENAI or _ANTHROPIC is set.

    POST /llm/openai/v1/chat/completions | /v1/completions | /v1/embeddings | /v1/responses
    POST /llm/anthropic/v1/messages

Each call: authenticate (a tokenmeter user token, or a service key with X-Tokenmeter-Account, as
for the gateway check; the Anthropic SDK's x-api-key may carry either), reserve an estimate, forward
with the upstream's credentials from settings, then settle the usage the upstream reports (streamed
or not) or release on an upstream failure. Every refusal of ours is in the vendor's error shape,
with the brief's fields inside; an Idempotency-Key names one call, charged once.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response

from api.metering import json_response, observe
from api.proxy import MAX_ERROR_BODY, LlmProxy, MeteredCall, ProxiedStream, Upstream, response_headers
from api.proxy_shapes import ENDPOINTS, Endpoint, Estimate, StreamTap, Vendor, estimate, text_tokens, vendor_error
from api.routes.gateway import charged_account
from api.security import read_token
from api.settings import Settings
from api.state import AppState
from meter import Decision, InvalidInput, MeterError
from meter._http import Header, decision_headers, denial_body, error_body, error_parts, process_time
from meter.usage import Usage, parse_usage

__all__ = ["build_router"]

PREFIX = {"openai": "/llm/openai", "anthropic": "/llm/anthropic"}
NO_RETRY: Header = (b"x-should-retry", b"false")  # the OpenAI and Anthropic SDKs honour it


class Refused(Exception):
    """An answer of ours (status, the brief's body, headers), to be sent in the vendor's shape."""

    def __init__(self, status: int, body: dict[str, Any], headers: list[Header] | None = None) -> None:
        self.status, self.body, self.headers = status, body, headers or []


def _refusal(vendor: Vendor, r: Refused, start: float) -> Response:
    headers = list(r.headers)
    if r.status in (401, 402, 403, 409, 413, 422) and NO_RETRY not in headers:
        headers.append(NO_RETRY)
    status = 400 if r.status == 422 else r.status  # the SDKs' invalid-request status
    return json_response(status, vendor_error(vendor, r.status, r.body), [*headers, process_time(start)])


def _proxy(state: AppState) -> LlmProxy:
    assert state.proxy is not None, "the proxy routes are mounted only with an upstream configured"
    return state.proxy


async def _account(request: Request, state: AppState) -> str:
    h = request.headers
    key = h.get("x-tokenmeter-key")
    authorization = h.get("authorization")
    api_key = h.get("x-api-key")  # the Anthropic SDK's header: a service key or a user token
    if api_key and not authorization and read_token(state.jwt_secret, api_key):
        authorization = f"Bearer {api_key}"
    elif api_key and not key:
        key = api_key
    return await charged_account(request, state, key=key, authorization=authorization,
                                 named=h.get("x-tokenmeter-account"))


def _body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidInput("body", "must be a JSON object") from None
    if not isinstance(body, dict):
        raise InvalidInput("body", "must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidInput("model", "must be a string")
    return body


async def _reserve(state: AppState, account: str, est: Estimate, key: str | None,
                   labels: dict[str, str | None]) -> Decision:
    """Hold the estimate. A hold over the plan's per-request maximum is cut to it when the caller
    set no max_tokens of its own (the output allowance was ours); otherwise the refusal stands."""
    meter = state.rt.meter
    ttl = state.rt.settings.proxy_hold_ttl_ms
    try:
        return await meter.reserve(account, est.total, ttl_ms=ttl, request_id=key, **labels)
    except InvalidInput as exc:
        cap = exc.maximum
        if exc.field != "tokens" or cap is None or est.output_given or est.input_tokens >= cap:
            raise
        return await meter.reserve(account, cap, ttl_ms=ttl, request_id=key, **labels)


def _ours(d: Decision, now_ms: int) -> list[Header]:
    return [*decision_headers(d, now_ms), (b"x-tokenmeter-hold", (d.hold_id or "").encode())]


async def _forward(proxy: LlmProxy, upstream: Upstream, request: Request, raw: bytes,
                   stream: bool) -> httpx.Response:
    req = proxy.client.build_request("POST", upstream.url(request.url.path.removeprefix(PREFIX[upstream.vendor])),
                                     headers=upstream.headers(request.headers), content=raw,
                                     params=request.url.query or None)
    return await proxy.client.send(req, stream=stream)


def _upstream_failure(exc: httpx.HTTPError) -> Refused:
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
        return Refused(504, error_body("upstream_timeout", "the upstream did not answer in time; nothing was "
                                                           "charged"))
    return Refused(502, error_body("upstream_unreachable", f"the upstream could not be reached "
                                                           f"({type(exc).__name__}); nothing was charged"))


async def metered(request: Request, endpoint: Endpoint) -> Response:
    start = time.perf_counter()
    state: AppState = request.app.state.tm
    proxy = _proxy(state)
    upstream = proxy.upstreams[endpoint.vendor]
    vendor = endpoint.vendor
    meter = state.rt.meter
    op = f"proxy_{vendor}"
    try:
        try:
            account = await _account(request, state)
            raw = await request.body()
            body = _body(raw)
            stream = body.get("stream") is True
            if stream and vendor == "openai" and endpoint.path in ("/v1/chat/completions", "/v1/completions"):
                options = body.get("stream_options")  # ask for the final chunk that carries the usage
                body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
                raw = json.dumps(body, separators=(",", ":")).encode()
            h = request.headers
            key = h.get("idempotency-key") or None
            est = estimate(endpoint, body, state.rt.settings.proxy_default_output_tokens)
            labels = {"model": body.get("model"), "agent": h.get("x-tokenmeter-agent"),
                      "project_id": h.get("x-tokenmeter-project")}
            d = await _reserve(state, account, est, key, labels)
        except HTTPException as exc:
            detail = exc.detail if isinstance(exc.detail, dict) else error_body("error", str(exc.detail))
            raise Refused(exc.status_code, detail, [(k.lower().encode(), v.encode())
                                                    for k, v in (exc.headers or {}).items()]) from None
        except MeterError as exc:
            raise Refused(*error_parts(exc)) from None
        now = meter.clock.now_ms()
        if not d.allowed:
            status = 402 if d.reason == "insufficient" else 429
            headers = decision_headers(d, now) + ([NO_RETRY] if d.reason != "rate_limited" else [])
            raise Refused(status, {**denial_body(d), "reason": d.reason}, headers)
        if d.replayed:
            raise Refused(409, error_body(
                "idempotency_key_used", "this Idempotency-Key already named a call, charged at most once; the "
                                        "proxy keeps no answers to replay: send a new key to call again",
                idempotency_key=key), [NO_RETRY])
    except Refused as r:
        observe(op, str(r.body.get("reason") or r.body.get("error")), start)
        return _refusal(vendor, r, start)

    metered_call = MeteredCall(meter, vendor, endpoint, account, d.hold_id or "", est, key, labels, state.tasks)
    ours = _ours(d, now)
    try:
        upstream_response = await _forward(proxy, upstream, request, raw, stream)
    except httpx.HTTPError as exc:
        await metered_call.release()
        observe(op, "upstream_failed", start)
        return _refusal(vendor, _upstream_failure(exc), start)
    except BaseException:
        metered_call.in_background(metered_call.release())
        raise
    if upstream_response.status_code >= 400:  # the upstream's own refusal: nothing to charge
        try:
            content = await upstream_response.aread() if stream else upstream_response.content
        except httpx.HTTPError:
            content = b""
        finally:
            await upstream_response.aclose()
        await metered_call.release()
        observe(op, f"upstream_{upstream_response.status_code}", start)
        content = content[:MAX_ERROR_BODY]
        response = Response(content, status_code=upstream_response.status_code)
        response.raw_headers = [*response_headers(upstream_response, ours), (b"content-length", b"%d" % len(content)),
                                process_time(start)]
        return response
    observe(op, "ok", start)
    if stream:
        return ProxiedStream(upstream_response, [*response_headers(upstream_response, ours), process_time(start)],
                             StreamTap(vendor), metered_call)
    return await _settled(metered_call, upstream_response, ours, start)


async def _settled(call: MeteredCall, upstream_response: httpx.Response, ours: list[Header],
                   start: float) -> Response:
    """A whole answer: settle its `usage` (else an estimate from its size), then send it with the
    balance after the charge."""
    content = upstream_response.content
    reported, model = True, None
    try:
        data = json.loads(content)
        usage = parse_usage(data)
        model = data.get("model") if isinstance(data.get("model"), str) else None
    except (ValueError, TypeError, AttributeError):  # no usage object: charge what it looks like
        reported = False
        usage = Usage(call.estimate.input_tokens, text_tokens(len(content)) if call.endpoint.output else 0)
    receipt = await call.in_background(call.settle(usage, reported, model))
    headers = response_headers(upstream_response, ours)
    if receipt is not None:
        headers = [(n, b"%d" % receipt.remaining if n == b"x-tokens-remaining" else v) for n, v in headers]
        headers += [(b"x-tokenmeter-charged", b"%d" % (receipt.charged or 0)),
                    (b"x-tokenmeter-transaction", receipt.transaction_id.encode())]
    response = Response(content, status_code=upstream_response.status_code)
    response.raw_headers = [*headers, (b"content-length", b"%d" % len(content)), process_time(start)]
    return response


async def passthrough(request: Request, vendor: Vendor, path: str) -> Response:
    """Another path of the upstream, unmetered (TOKENMETER_PROXY_PASSTHROUGH), for an authenticated caller."""
    start = time.perf_counter()
    state: AppState = request.app.state.tm
    proxy = _proxy(state)
    upstream = proxy.upstreams[vendor]
    try:
        try:
            await _account(request, state)
        except HTTPException as exc:
            detail = exc.detail if isinstance(exc.detail, dict) else error_body("error", str(exc.detail))
            raise Refused(exc.status_code, detail) from None
        except MeterError as exc:
            raise Refused(*error_parts(exc)) from None
        req = proxy.client.build_request(request.method, upstream.url("/" + path), content=await request.body(),
                                         headers=upstream.headers(request.headers),
                                         params=request.url.query or None)
        try:
            answer = await proxy.client.send(req)
        except httpx.HTTPError as exc:
            raise _upstream_failure(exc) from None
    except Refused as r:
        return _refusal(vendor, r, start)
    response = Response(answer.content, status_code=answer.status_code)
    response.raw_headers = [*response_headers(answer, []), (b"content-length", b"%d" % len(answer.content)),
                            process_time(start)]
    return response


def _metered_route(endpoint: Endpoint) -> Any:
    async def route(request: Request) -> Response:
        return await metered(request, endpoint)
    return route


def _other_route(vendor: Vendor, allow: bool) -> Any:
    async def other(request: Request, path: str) -> Response:
        if not allow:
            return _refusal(vendor, Refused(404, error_body(
                "not_found", f"/{path} is not metered here (TOKENMETER_PROXY_PASSTHROUGH is off)")),
                time.perf_counter())
        return await passthrough(request, vendor, path)
    return other


def build_router(settings: Settings) -> APIRouter:
    """The routes of the configured upstreams only."""
    configured: tuple[tuple[Vendor, str | None], ...] = (("openai", settings.upstream_openai),
                                                         ("anthropic", settings.upstream_anthropic))
    vendors = [vendor for vendor, url in configured if url]
    router = APIRouter(tags=["proxy"])
    for endpoint in ENDPOINTS:
        if endpoint.vendor in vendors:
            router.add_api_route(PREFIX[endpoint.vendor] + endpoint.path, _metered_route(endpoint), methods=["POST"],
                                 summary=f"{endpoint.vendor} {endpoint.path}, metered",
                                 name=f"proxy_{endpoint.vendor}{endpoint.path}")
    for vendor in vendors:
        router.add_api_route(PREFIX[vendor] + "/{path:path}", _other_route(vendor, settings.proxy_passthrough),
                             include_in_schema=False, methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                             name=f"proxy_other_{vendor}")
    return router
