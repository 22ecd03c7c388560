"""The pure-ASGI debit fast path (api/fastpath.py) answers exactly as the FastAPI route does,
and the ASGI middleware (meter/asgi.py) as both, byte for byte.

Each case runs on identically prepared accounts: once through the app (where the fast path
serves POST /api/v1/meter/debit), once through the same app built without the fast path (the
route serves it), sharing the running app's state, and once through TokenMeterMiddleware on
the same meter. Status, body and every header must match (account ids swapped; X-Process-Time
compared by presence and format only)."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from api.app import create_app
from api.fastpath import DEBIT_PATH, MAX_BODY_BYTES, MeterFastPath, _route_path
from meter import FakeClock
from meter._clock import DAY_MS
from meter.asgi import TokenMeterMiddleware
from tests.api.conftest import Api

VARYING = {"x-process-time", "ratelimit-reset", "date", "server"}


@pytest.fixture
async def route_only(api: Api) -> AsyncIterator[httpx.AsyncClient]:
    """The same app without the fast path, on the running app's state."""
    app = create_app(api.settings)
    app.user_middleware = [m for m in app.user_middleware if m.cls is not MeterFastPath]
    app.state.tm = api.state
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://route.test") as client:
        yield client


def _normal(r: httpx.Response, account: str) -> tuple[int, Any, dict[str, str]]:
    body = r.text.replace(account, "ACCOUNT")
    headers = {k: v for k, v in r.headers.items() if k not in VARYING}
    return r.status_code, body, headers


async def _both(api: Api, route: httpx.AsyncClient, make: Any, fast_acct: str, route_acct: str) -> tuple[Any, Any]:
    fast = await api.client.post(DEBIT_PATH, **make(fast_acct))
    slow = await route.post(DEBIT_PATH, **make(route_acct))
    return _normal(fast, fast_acct), _normal(slow, route_acct)


async def test_fast_path_answers_as_the_route(api: Api, route_only: httpx.AsyncClient) -> None:
    svc = api.service()
    r = await api.client.post("/api/v1/admin/api-keys", json={"name": "adm", "scopes": ["admin"]}, headers=svc)
    admin_only = {"Authorization": f"Bearer {r.json()['key']}"}
    tag = uuid.uuid4().hex[:6]
    fast_acct, route_acct = f"fp-{tag}-a", f"fp-{tag}-b"
    for acct in (fast_acct, route_acct):
        r = await api.client.post("/api/v1/meter/accounts", json={"account_id": acct}, headers=svc)
        assert r.status_code == 201
    idem = {**svc, "Idempotency-Key": f"k-{tag}"}
    cases = [
        ("allowed", lambda a: {"json": {"account_id": a, "tokens": 120, "agent": "code", "model": "sonnet",
                                        "input_tokens": 20, "output_tokens": 100}, "headers": svc}),
        ("idempotent first", lambda a: {"json": {"account_id": a, "tokens": 7}, "headers": {
            **idem, "Idempotency-Key": f"{idem['Idempotency-Key']}-{a}"}}),
        ("idempotent replay", lambda a: {"json": {"account_id": a, "tokens": 7}, "headers": {
            **idem, "Idempotency-Key": f"{idem['Idempotency-Key']}-{a}"}}),
        ("idempotency conflict", lambda a: {"json": {"account_id": a, "tokens": 8}, "headers": {
            **idem, "Idempotency-Key": f"{idem['Idempotency-Key']}-{a}"}}),
        ("X-API-Key header", lambda a: {"json": {"account_id": a, "tokens": 1},
                                        "headers": {"X-API-Key": svc["Authorization"][7:]}}),
        ("no key", lambda a: {"json": {"account_id": a, "tokens": 1}}),
        ("unknown key", lambda a: {"json": {"account_id": a, "tokens": 1},
                                   "headers": {"Authorization": "Bearer tmk_nope_nope"}}),
        ("admin-only key", lambda a: {"json": {"account_id": a, "tokens": 1}, "headers": admin_only}),
        ("tokens 0", lambda a: {"json": {"account_id": a, "tokens": 0}, "headers": svc}),
        ("over the per-request maximum", lambda a: {"json": {"account_id": a, "tokens": 9_000}, "headers": svc}),
        ("not JSON", lambda a: {"content": b"{" + a.encode(), "headers": svc}),
        ("missing field", lambda a: {"json": {"account_id": a}, "headers": svc}),
        ("bad model label", lambda a: {"json": {"account_id": a, "tokens": 1, "model": "gpt 9!"}, "headers": svc}),
        ("empty Idempotency-Key", lambda a: {"json": {"account_id": a, "tokens": 1},
                                             "headers": {**svc, "Idempotency-Key": ""}}),
        ("unknown account", lambda a: {"json": {"account_id": f"{a}-nobody", "tokens": 1}, "headers": svc}),
        ("empty first Authorization", lambda a: {"json": {"account_id": a, "tokens": 1}, "headers": [
            ("Authorization", ""), ("Authorization", svc["Authorization"])]}),
        ("over 16 KiB", lambda a: {"content": b'{"account_id": "%s", "tokens": 1' % a.encode()
                                   + b" " * MAX_BODY_BYTES + b"}", "headers": svc}),
        *((f"tokens {raw}", lambda a, raw=raw: {  # strict integers: no coercion, as the route
            "content": b'{"account_id": "%s", "tokens": %s}' % (a.encode(), raw.encode()), "headers": svc})
          for raw in ("true", '"1"', '" 5 "', "1.0", "1e3", "null")),
        ("drain", lambda a: {"json": {"account_id": a, "tokens": 8_000}, "headers": svc}),
        ("insufficient", lambda a: {"json": {"account_id": a, "tokens": 8_000}, "headers": svc}),
    ]
    statuses = []
    for name, make in cases:
        fast, slow = await _both(api, route_only, make, fast_acct, route_acct)
        assert fast == slow, name
        statuses.append(fast[0])
    # the cases did reach every answer the endpoint has (else the comparison proves little)
    assert statuses == [200, 200, 200, 409, 200, 401, 401, 403, 422, 422, 422, 422, 422, 422, 404, 401, 413,
                        *[422] * 6, 200, 402]


async def test_fast_path_serves_the_debit_without_the_app(api: Api) -> None:
    """Only the debit: the wrapped app is never called for it, and is called for the rest."""
    acct = f"fp-{uuid.uuid4().hex[:6]}"
    assert (await api.client.post("/api/v1/meter/accounts", json={"account_id": acct},
                                  headers=api.service())).status_code == 201
    passed: list[str] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        passed.append(f"{scope['method']} {scope['path']}")
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    fast = MeterFastPath(inner)

    async def with_app(scope: Any, receive: Any, send: Any) -> None:
        scope["app"] = api.app  # what Starlette sets before its middleware runs
        await fast(scope, receive, send)

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=with_app), base_url="http://t") as client:
        r = await client.post(DEBIT_PATH, json={"account_id": acct, "tokens": 5}, headers=api.service())
        assert r.status_code == 200 and r.json()["allowed"] is True and r.json()["remaining_tokens"] == 9_995
        assert r.headers["x-tokens-remaining"] == "9995" and float(r.headers["x-process-time"]) >= 0
        assert passed == []
        assert (await client.get(DEBIT_PATH)).status_code == 204
        assert (await client.post(DEBIT_PATH + "/x", json={})).status_code == 204
        assert (await client.post("/api/v1/meter/reserve", json={})).status_code == 204
    assert passed == [f"GET {DEBIT_PATH}", f"POST {DEBIT_PATH}/x", "POST /api/v1/meter/reserve"]


async def test_decisions_are_counted_by_outcome(api: Api) -> None:
    acct = f"fp-{uuid.uuid4().hex[:6]}"
    await api.client.post("/api/v1/meter/accounts", json={"account_id": acct}, headers=api.service())

    def count(outcome: str) -> float:
        text = metrics_text
        line = f'tokenmeter_decisions_total{{op="debit",outcome="{outcome}"}} '
        return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(line))

    metrics_text = (await api.client.get("/metrics")).text
    before = {o: count(o) for o in ("ok", "insufficient", "invalid_input")}
    for tokens in (5_000, 5_000, 5_000, 0):  # ok, ok, insufficient (10,000 on the free plan), 422
        await api.client.post(DEBIT_PATH, json={"account_id": acct, "tokens": tokens}, headers=api.service())
    metrics_text = (await api.client.get("/metrics")).text
    assert count("ok") - before["ok"] == 2
    assert count("insufficient") - before["insufficient"] == 1
    assert count("invalid_input") - before["invalid_input"] == 1
    assert 'tokenmeter_decision_seconds_bucket{le="0.001",op="debit"}' in metrics_text


async def test_fast_path_under_a_root_path(api: Api) -> None:
    """Mounted under a root path (a proxy prefix), the debit path is matched as the router
    matches it: without the prefix."""
    acct = f"fp-{uuid.uuid4().hex[:6]}"
    await api.client.post("/api/v1/meter/accounts", json={"account_id": acct}, headers=api.service())
    transport = httpx.ASGITransport(app=api.app, root_path="/svc")
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.post("/svc" + DEBIT_PATH, json={"account_id": acct, "tokens": 5}, headers=api.service())
        assert r.status_code == 200 and r.json()["remaining_tokens"] == 9_995
    r = await api.client.get(f"/api/v1/meter/accounts/{acct}/balance", headers=api.service())
    assert r.json()["remaining_tokens"] == 9_995
    assert _route_path({"path": "/svc" + DEBIT_PATH, "root_path": "/svc"}) == DEBIT_PATH
    assert _route_path({"path": DEBIT_PATH, "root_path": ""}) == DEBIT_PATH
    assert _route_path({"path": "/svcx" + DEBIT_PATH, "root_path": "/svc"}) == "/svcx" + DEBIT_PATH
    assert _route_path({"path": "/svc", "root_path": "/svc"}) == ""


async def test_an_oversized_body_is_refused_without_a_charge(api: Api) -> None:
    acct = f"fp-{uuid.uuid4().hex[:6]}"
    await api.client.post("/api/v1/meter/accounts", json={"account_id": acct}, headers=api.service())
    padded = b'{"account_id": "%s", "tokens": 5, "agent": null' % acct.encode() + b" " * MAX_BODY_BYTES + b"}"
    r = await api.client.post(DEBIT_PATH, content=padded, headers={**api.service(), "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large" and r.json()["field"] == "body"
    r = await api.client.get(f"/api/v1/meter/accounts/{acct}/balance", headers=api.service())
    assert r.json()["remaining_tokens"] == 10_000
    small = padded.replace(b" " * MAX_BODY_BYTES, b" " * 100)
    r = await api.client.post(DEBIT_PATH, content=small, headers={**api.service(), "Content-Type": "application/json"})
    assert r.status_code == 200 and r.json()["remaining_tokens"] == 9_995


Raw = tuple[int, bytes, list[tuple[bytes, bytes]]]
_APP_HEADERS = [(b"content-type", b"text/plain"), (b"content-length", b"5")]
_METERING = (b"x-tokens-", b"x-requests-", b"x-ratelimit-", b"ratelimit", b"retry-after", b"x-process-time")


async def _hello(scope: Any, receive: Any, send: Any) -> None:
    """The app behind the middleware: a plain 200."""
    await send({"type": "http.response.start", "status": 200, "headers": list(_APP_HEADERS)})
    await send({"type": "http.response.body", "body": b"hello"})


def _raw(r: httpx.Response, account: str) -> Raw:
    """Status, body and the header list in order, account id swapped; X-Process-Time's value
    checked for its format, then blanked."""
    headers = []
    for name, value in r.headers.raw:
        if name == b"x-process-time":
            assert re.fullmatch(rb"\d+\.\d{3}", value), value
            value = b"T"
        elif name == b"content-length":
            value = b"N"  # account ids of different lengths: the length is checked by httpx itself
        headers.append((name, value.replace(account.encode(), b"ACCOUNT")))
    return r.status_code, r.content.replace(account.encode(), b"ACCOUNT"), headers


async def test_route_fast_path_and_middleware_answer_byte_for_byte(api: Api, route_only: httpx.AsyncClient) -> None:
    meter = api.state.rt.meter
    today = meter.clock.now_ms() // DAY_MS * DAY_MS
    # 01:00:00.5 UTC on the meter's clock: 82,799.5 s to midnight, rounded up. (RateLimit-Reset
    # was once read from the wall clock on the route and the fast path: it differed from this.)
    meter.clock = FakeClock(today + 3_600_500)
    middleware = TokenMeterMiddleware(_hello, meter=meter, account="x-account",
                                      tokens=lambda scope: int(dict(scope["headers"])[b"x-tokens"]))
    mw = httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://mw.test")
    svc = api.service()
    tag = uuid.uuid4().hex[:6]
    fast_acct, route_acct, mw_acct = f"bb-{tag}-a", f"bb-{tag}-b", f"bb-{tag}-c"
    for acct in (fast_acct, route_acct, mw_acct):
        r = await api.client.post("/api/v1/meter/accounts", json={"account_id": acct}, headers=svc)
        assert r.status_code == 201

    async def three(account: str | None, tokens: int, key: str | None = None) -> tuple[Raw, Raw, Raw]:
        idem = {} if key is None else {"Idempotency-Key": key}
        out = []
        for client, acct in ((api.client, fast_acct), (route_only, route_acct)):
            a = acct if account is None else account
            r = await client.post(DEBIT_PATH, json={"account_id": a, "tokens": tokens}, headers={**svc, **idem})
            out.append(_raw(r, acct))
        a = mw_acct if account is None else account
        r = await mw.get("/", headers={"x-account": a, "x-tokens": str(tokens), **idem})
        out.append(_raw(r, mw_acct))
        return out[0], out[1], out[2]

    def metering(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        return [h for h in headers if h[0].startswith(_METERING)]

    def denial_fields(body: bytes, of: bytes) -> dict[str, Any]:
        sub = json.loads(body)
        return {k: v for k, v in json.loads(of).items() if k in sub}

    statuses = []
    cases: list[tuple[str, str | None, int, str | None]] = [
        ("allowed", None, 120, None),
        ("idempotent first", None, 7, f"k-{tag}"),
        ("idempotent replay", None, 7, f"k-{tag}"),
        ("idempotency conflict", None, 8, f"k-{tag}"),
        ("over the per-request maximum", None, 9_000, None),
        ("empty Idempotency-Key", None, 1, ""),
        ("unknown account", f"nobody-{tag}", 1, None),
        ("drain", None, 8_000, None),
        ("insufficient", None, 8_000, None),
    ]
    for name, account, tokens, key in cases:
        fast, route, through_mw = await three(account, tokens, key)
        assert fast == route, name
        statuses.append(fast[0])
        if fast[0] == 200:  # the middleware's answer is the app's, with the metering headers added
            assert through_mw[:2] == (200, b"hello"), name
            assert through_mw[2] == [*_APP_HEADERS[:1], (b"content-length", b"N"), *metering(fast[2])], name
        elif fast[0] in (402, 429):  # the denial: the same headers; the body the denial fields alone
            assert through_mw[0] == fast[0] and through_mw[2] == fast[2], name
            assert json.loads(through_mw[1]) == denial_fields(through_mw[1], fast[1]), name
        else:
            assert through_mw == fast, name
    assert statuses == [200, 200, 200, 409, 422, 422, 404, 200, 402]
    assert (b"ratelimit-reset", b"82800") in fast[2]

    # the daily cap (100 requests on the free plan): fill the day, then all three refuse alike
    used = int(dict(fast[2])[b"x-requests-today"])
    for _ in range(100 - used):
        assert all(r[0] == 200 for r in await three(None, 1))
    fast, route, through_mw = await three(None, 1)
    assert fast == route and fast[0] == 429
    assert (b"retry-after", b"82800") in fast[2] and through_mw[2] == fast[2]
    assert json.loads(through_mw[1]) == denial_fields(through_mw[1], fast[1])
    await mw.aclose()
