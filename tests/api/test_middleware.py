"""TokenMeterMiddleware on a tiny raw ASGI app, over every wallet backend (reference, fakeredis,
real Redis). The app records each call, so "denied means the app never ran" is checked directly."""

from __future__ import annotations

import logging
import pathlib
import re
import socket
import subprocess
import sys
from typing import Any

import httpx
import pytest
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.types import Message, Receive, Scope, Send

import api.middleware as middleware_module
from api.middleware import TokenMeterMiddleware, headers_of
from meter import FakeClock, Meter
from meter import asgi as meter_asgi
from meter._clock import DAY_MS
from tests.conftest import MeterFactory
from tests.meter.test_wallet import catalog_with

pytestmark = pytest.mark.redis

DAY_S = DAY_MS // 1000
X_TOKENS = ("x-tokens-remaining", "x-tokens-used-today", "x-requests-today")
RATELIMIT = ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset")


class App:
    """A raw ASGI app: answers 200 'hello' in two body chunks and records every scope it gets."""

    def __init__(self) -> None:
        self.scopes: list[Scope] = []

    @property
    def http_calls(self) -> int:
        return sum(1 for s in self.scopes if s["type"] == "http")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scopes.append(scope)
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1000})
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"), (b"x-app", b"yes")]})
        await send({"type": "http.response.body", "body": b"hel", "more_body": True})
        await send({"type": "http.response.body", "body": b"lo"})


def account_header(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-account":
            return str(value.decode())
    return None


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc.test")


def wrap(meter: Meter, **options: Any) -> tuple[App, TokenMeterMiddleware]:
    inner = App()
    options.setdefault("account", account_header)
    return inner, TokenMeterMiddleware(inner, meter=meter, **options)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_allowed_request_gets_metering_headers(backend: str, make_meter: MeterFactory,
                                                     clock: FakeClock) -> None:
    meter = await make_meter(backend)
    await meter.open_account("u1")  # free: 10,000 tokens, 100 requests/day
    clock.advance(3_600_500)  # 01:00:00.5 UTC: 82,799.5 s to midnight, rounded up
    inner, app = wrap(meter, tokens=250, agent="code", model="sonnet")
    async with client_for(app) as client:
        r1 = await client.get("/work", headers={"x-account": "u1"})
        r2 = await client.get("/work", headers={"x-account": "u1"})
    assert r1.status_code == 200 and r1.text == "hello" and r1.headers["x-app"] == "yes"
    assert [r1.headers[h] for h in X_TOKENS] == ["9750", "250", "1"]
    assert [r1.headers[h] for h in RATELIMIT] == ["100", "99", "82800"]
    assert re.fullmatch(r"\d+\.\d{3}", r1.headers["x-process-time"])
    assert [r2.headers[h] for h in X_TOKENS] == ["9500", "500", "2"]
    assert r2.headers["ratelimit-remaining"] == "98"
    assert inner.http_calls == 2
    bal = await meter.balance("u1")
    assert (bal.remaining_tokens, bal.requests_today, bal.tokens_used_today) == (9_500, 2, 500)


async def test_tokens_callable_and_no_ratelimit_headers_without_daily_cap(
        backend: str, make_meter: MeterFactory) -> None:
    meter = await make_meter(backend, catalog=catalog_with())  # daily_requests defaults to 0: no cap
    await meter.open_account("u1", plan="t")
    inner, app = wrap(meter, tokens=lambda scope: len(scope["path"]))
    async with client_for(app) as client:
        r = await client.get("/abcdefg", headers={"x-account": "u1"})  # 8 tokens
    assert r.status_code == 200
    assert [r.headers[h] for h in X_TOKENS] == ["992", "8", "1"]
    assert not any(h in r.headers for h in RATELIMIT)
    assert inner.http_calls == 1


async def test_daily_cap_is_429_and_app_not_called(backend: str, make_meter: MeterFactory,
                                                   clock: FakeClock) -> None:
    meter = await make_meter(backend, catalog=catalog_with(daily_requests=2))
    await meter.open_account("u1", plan="t")
    inner, app = wrap(meter, tokens=10)
    async with client_for(app) as client:
        ok = [await client.get("/", headers={"x-account": "u1"}) for _ in range(2)]
        clock.advance(DAY_MS - 1_500)  # 1.5 s before midnight: Retry-After rounds up to 2
        r = await client.get("/", headers={"x-account": "u1"})
    assert [x.status_code for x in ok] == [200, 200]
    assert ok[1].headers["ratelimit-remaining"] == "0"
    assert r.status_code == 429 and r.headers["content-type"] == "application/json"
    assert r.headers["retry-after"] == "2"
    assert [r.headers[h] for h in RATELIMIT] == ["2", "0", "2"]
    assert [r.headers[h] for h in X_TOKENS] == ["980", "20", "2"]
    body = r.json()
    assert body["error"] == "Daily request limit reached" and body["reason"] == "daily_cap"
    assert (body["daily_request_limit"], body["requests_today"], body["retry_after_ms"]) == (2, 2, 1_500)
    assert "x-app" not in r.headers
    assert inner.http_calls == 2
    assert (await meter.balance("u1")).remaining_tokens == 980
    clock.advance(1_500)  # a new UTC day: admitted again
    async with client_for(app) as client:
        assert (await client.get("/", headers={"x-account": "u1"})).status_code == 200


async def test_per_minute_limit_is_429(backend: str, make_meter: MeterFactory) -> None:
    meter = await make_meter(backend, catalog=catalog_with(requests_per_minute=1))
    await meter.open_account("u1", plan="t")
    inner, app = wrap(meter)
    async with client_for(app) as client:
        first = await client.get("/", headers={"x-account": "u1"})
        r = await client.get("/", headers={"x-account": "u1"})
    assert first.status_code == 200
    assert r.status_code == 429 and r.json()["reason"] == "rate_limited"
    assert r.headers["retry-after"] == "60"
    assert inner.http_calls == 1


async def test_empty_balance_is_402_with_the_brief_body(backend: str, make_meter: MeterFactory) -> None:
    meter = await make_meter(backend, catalog=catalog_with())
    await meter.open_account("u1", plan="t")  # 1,000 tokens
    inner, app = wrap(meter, tokens=250)
    async with client_for(app) as client:
        ok = [(await client.get("/", headers={"x-account": "u1"})).status_code for _ in range(4)]
        r = await client.get("/", headers={"x-account": "u1"})
    assert ok == [200] * 4
    assert r.status_code == 402
    assert r.json() == {"error": "Insufficient tokens", "message": "Need 250 more tokens. Current balance: 0",
                        "required": 250, "available": 0, "shortage": 250,
                        "packages_url": "/api/v1/tokens/packages"}
    assert [r.headers[h] for h in X_TOKENS] == ["0", "1000", "4"]
    assert "retry-after" not in r.headers
    assert inner.http_calls == 4


@pytest.mark.parametrize(("path", "account", "metered"), [
    ("/api/run", None, False),  # no account: not metered
    ("/health", "u1", False),  # outside `paths`
    ("/apiary", "u1", False),  # a prefix matches whole path segments only
    ("/api", "u1", True),
    ("/api/run", "u1", True),
])
async def test_unmetered_requests_pass_through(backend: str, make_meter: MeterFactory, path: str,
                                               account: str | None, metered: bool) -> None:
    meter = await make_meter(backend)
    await meter.open_account("u1")
    inner, app = wrap(meter, tokens=100, paths=("/api/",))
    headers = {"x-account": account} if account else {}
    async with client_for(app) as client:
        r = await client.get(path, headers=headers)
    assert r.status_code == 200 and r.text == "hello" and inner.http_calls == 1
    assert all((h in r.headers) is metered for h in (*X_TOKENS, "x-process-time"))
    assert (await meter.balance("u1")).remaining_tokens == (9_900 if metered else 10_000)


async def test_idempotency_key_replay_charges_once(backend: str, make_meter: MeterFactory) -> None:
    meter = await make_meter(backend)
    await meter.open_account("u1")
    inner, app = wrap(meter, tokens=300)
    async with client_for(app) as client:
        first = await client.post("/", headers={"x-account": "u1", "idempotency-key": "req-1"})
        replay = await client.post("/", headers={"x-account": "u1", "idempotency-key": "req-1"})
        other = await client.post("/", headers={"x-account": "u1", "idempotency-key": "req-2"})
    assert [first.headers[h] for h in X_TOKENS] == ["9700", "300", "1"]
    assert [replay.headers[h] for h in X_TOKENS] == ["9700", "300", "1"]  # the stored answer
    assert [other.headers[h] for h in X_TOKENS] == ["9400", "600", "2"]
    assert inner.http_calls == 3  # a replay is answered by the app again; only the charge is deduplicated
    bal = await meter.balance("u1")
    assert (bal.remaining_tokens, bal.requests_today) == (9_400, 2)


async def test_idempotency_key_reused_with_other_tokens_is_409(backend: str, make_meter: MeterFactory) -> None:
    meter = await make_meter(backend)
    await meter.open_account("u1")
    inner, app = wrap(meter, tokens=lambda scope: 100 if scope["path"] == "/a" else 200)
    async with client_for(app) as client:
        await client.post("/a", headers={"x-account": "u1", "idempotency-key": "k"})
        r = await client.post("/b", headers={"x-account": "u1", "idempotency-key": "k"})
    assert r.status_code == 409 and r.json()["error"] == "idempotency_conflict"
    assert r.json()["idempotency_key"] == "k"
    assert inner.http_calls == 1
    assert (await meter.balance("u1")).remaining_tokens == 9_900


async def test_tokens_over_the_per_request_maximum_is_422(backend: str, make_meter: MeterFactory) -> None:
    meter = await make_meter(backend)
    await meter.open_account("u1")  # free: at most 8,192 per request
    inner, app = wrap(meter, tokens=8_193)
    async with client_for(app) as client:
        r = await client.get("/", headers={"x-account": "u1"})
    assert r.status_code == 422
    body = r.json()
    assert body["error"] == "invalid_input" and body["field"] == "tokens" and "8192" in body["message"]
    assert "x-process-time" in r.headers and "x-tokens-remaining" not in r.headers
    assert inner.http_calls == 0
    bal = await meter.balance("u1")
    assert (bal.remaining_tokens, bal.requests_today) == (10_000, 0)


async def test_bad_account_id_is_422_and_unknown_account_is_404(backend: str, make_meter: MeterFactory) -> None:
    meter = await make_meter(backend)
    inner, app = wrap(meter)
    async with client_for(app) as client:
        bad = await client.get("/", headers={"x-account": "not valid!"})
        unknown = await client.get("/", headers={"x-account": "ghost"})
        bad_key = await client.get("/", headers={"x-account": "ghost", "idempotency-key": "x" * 256})
    assert bad.status_code == 422 and bad.json()["field"] == "account_id"
    assert unknown.status_code == 404
    assert unknown.json() == {"error": "unknown_account", "message": "unknown account 'ghost'", "account_id": "ghost"}
    # the header the caller sent, as the HTTP API names it (it said the meter's "request_id")
    assert bad_key.status_code == 422 and bad_key.json()["field"] == "Idempotency-Key"
    assert inner.http_calls == 0


@pytest.fixture
async def down_meter() -> Any:
    meter = await Meter.connect(f"redis://127.0.0.1:{closed_port()}/0", timeout_ms=100)
    yield meter
    await meter.close()


async def test_redis_down_fails_closed_with_503(down_meter: Meter) -> None:
    inner, app = wrap(down_meter)
    async with client_for(app) as client:
        r = await client.get("/", headers={"x-account": "u1"})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"] == "store_unavailable"
    assert "x-tokens-metering" not in r.headers
    assert inner.http_calls == 0


async def test_redis_down_fail_open_passes_through_unmetered(down_meter: Meter) -> None:
    inner, app = wrap(down_meter, fail_open=True)
    async with client_for(app) as client:
        r = await client.get("/", headers={"x-account": "u1"})
    assert r.status_code == 200 and r.text == "hello"
    assert r.headers["x-tokens-metering"] == "unavailable"
    assert not any(h in r.headers for h in X_TOKENS)
    assert inner.http_calls == 1


async def test_lifespan_and_websocket_pass_through_untouched(down_meter: Meter) -> None:
    # A meter whose Redis is down: touching it at all would show up as a 503 or an exception.
    inner, app = wrap(down_meter)
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    assert inner.scopes == [scope]
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]

    ws = {"type": "websocket", "path": "/ws", "headers": [(b"x-account", b"u1")]}
    sent.clear()
    await app(ws, receive, send)
    assert inner.scopes[-1] is ws and sent == [{"type": "websocket.close", "code": 1000}]


async def test_body_streams_through_unbuffered(backend: str, make_meter: MeterFactory) -> None:
    meter = await make_meter(backend)
    await meter.open_account("u1")
    inner, app = wrap(meter)
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/", "headers": [(b"x-account", b"u1")]}
    await app(scope, receive, send)
    assert inner.http_calls == 1
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body", "http.response.body"]
    assert [m.get("body") for m in sent[1:]] == [b"hel", b"lo"]  # the app's own chunks, as sent
    names = [name for name, _ in sent[0]["headers"]]
    assert names[:2] == [b"content-type", b"x-app"]  # the app's headers first, kept as they were
    assert set(names[2:]) == {b"x-tokens-remaining", b"x-tokens-used-today", b"x-requests-today",
                              b"ratelimit-limit", b"ratelimit-remaining", b"ratelimit-reset", b"x-process-time",
                              b"ratelimit-policy", b"ratelimit", *(b"x-ratelimit-%s-%s" % (what, of)
                                                                   for what in (b"limit", b"remaining", b"reset")
                                                                   for of in (b"requests", b"tokens"))}


@pytest.mark.parametrize(("options", "error"), [
    ({"tokens": 0}, ValueError),
    ({"tokens": True}, ValueError),
    ({"tokens": "5"}, ValueError),
    ({"paths": "/api"}, TypeError),
    ({"account": 5}, TypeError),
    ({"account": ""}, ValueError),
    ({"on_error_status": 500}, ValueError),
    ({"meter": object()}, TypeError),
])
def test_bad_configuration_fails_at_start(options: dict[str, Any], error: type[Exception]) -> None:
    options.setdefault("account", account_header)
    options.setdefault("meter", "redis://127.0.0.1:6379/0")  # a URL: nothing connects at start
    with pytest.raises(error):
        TokenMeterMiddleware(App(), **options)


def test_public_surface() -> None:
    def key(name: str) -> tuple[int, str]:  # ruff RUF022: CONSTANTS, Classes, functions
        return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)

    exported = middleware_module.__all__
    assert exported == sorted(exported, key=key) == ["AccountOf", "TokenMeterMiddleware", "TokensOf", "headers_of"]
    assert exported == meter_asgi.__all__  # api.middleware re-exports the library's middleware
    assert TokenMeterMiddleware is meter_asgi.TokenMeterMiddleware
    assert not issubclass(TokenMeterMiddleware, BaseHTTPMiddleware)


def test_the_middleware_imports_without_a_web_framework() -> None:
    """`import meter.asgi` loads the meter alone: no FastAPI, Starlette, SQLAlchemy, Prometheus,
    and no top-level `api` package (which would clash with an app's own `api/`)."""
    code = ("import sys, meter.asgi; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('fastapi', 'starlette', 'sqlalchemy', 'prometheus_client', 'api')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         cwd=pathlib.Path(__file__).parents[2])
    assert out.stdout.strip() == "[]", out.stdout


async def test_a_redis_url_connects_on_the_first_request() -> None:
    inner = App()
    app = TokenMeterMiddleware(inner, meter="fakeredis://", account="x-account")  # built outside a loop's call
    assert app._meter is None  # nothing connected yet
    async with client_for(app) as client:
        first = await client.get("/", headers={"x-account": "u1"})
        connected = await app.meter()
        await connected.open_account("u1")
        second = await client.get("/", headers={"x-account": "u1"})
    assert first.status_code == 404 and first.json()["error"] == "unknown_account"  # it did connect
    assert second.status_code == 200 and second.headers["x-tokens-remaining"] == "9999"
    assert await app.meter() is connected and inner.http_calls == 1
    await connected.close()


async def test_a_meter_it_connected_is_closed_at_shutdown() -> None:
    inner = App()
    app = TokenMeterMiddleware(inner, meter="fakeredis://", account="x-account")
    connected = await app.meter()
    closed: list[bool] = []
    close = connected.close

    async def recording_close() -> None:
        closed.append(True)
        await close()

    connected.close = recording_close  # type: ignore[method-assign]
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[Message] = []

    async def receive() -> Message:
        return next(messages)

    async def send(message: Message) -> None:
        sent.append(message)

    await app({"type": "lifespan"}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert closed == [True] and app._meter is None  # a request after a restart connects again


async def test_a_redis_url_that_is_down_fails_closed() -> None:
    inner = App()
    app = TokenMeterMiddleware(inner, meter=f"redis://127.0.0.1:{closed_port()}/0", account="x-account")
    async with client_for(app) as client:
        r = await client.get("/", headers={"x-account": "u1"})
    assert r.status_code == 503 and r.json()["error"] == "store_unavailable" and inner.http_calls == 0
    await (await app.meter()).close()


async def test_account_by_header_name_and_headers_of(backend: str, make_meter: MeterFactory) -> None:
    meter = await make_meter(backend)
    await meter.open_account("u1")
    seen: list[dict[str, str]] = []

    def account(scope: Scope) -> str | None:
        seen.append(headers_of(scope))
        return None

    inner, by_name = wrap(meter, account="X-Account")  # any case: header names are case-insensitive
    _, by_callable = wrap(meter, account=account)
    async with client_for(by_name) as client:
        metered = await client.get("/", headers={"x-account": "u1"})
        empty = await client.get("/", headers={"x-account": ""})
        missing = await client.get("/")
    async with client_for(by_callable) as client:
        await client.get("/", headers=[("X-User", "a"), ("x-user", "b")])
    assert metered.headers["x-tokens-remaining"] == "9999"
    assert "x-tokens-remaining" not in empty.headers and "x-tokens-remaining" not in missing.headers
    assert inner.http_calls == 3
    assert seen[0]["x-user"] == "a"  # lowercase names; the first of a repeated header wins, as in Starlette


@pytest.mark.parametrize("status", [401, 400])
async def test_a_raising_account_callable_is_answered_not_a_500(
        backend: str, make_meter: MeterFactory, status: int, caplog: pytest.LogCaptureFixture) -> None:
    meter = await make_meter(backend)

    def account(scope: Scope) -> str:
        raise KeyError("no session")

    inner, app = wrap(meter, account=account, on_error_status=status)
    with caplog.at_level(logging.WARNING, logger="meter.asgi"):
        async with client_for(app) as client:
            r = await client.get("/work")
    assert r.status_code == status
    assert r.json()["error"] == {401: "unauthorized", 400: "bad_request"}[status]
    assert inner.http_calls == 0
    assert any("KeyError" in rec.getMessage() and "GET /work" in rec.getMessage() for rec in caplog.records)


async def test_packages_url_is_configurable(backend: str, make_meter: MeterFactory) -> None:
    meter = await make_meter(backend, catalog=catalog_with())
    await meter.open_account("u1", plan="t")  # 1,000 tokens
    _, app = wrap(meter, tokens=2_000, packages_url="https://shop.example/tokens")
    async with client_for(app) as client:
        r = await client.get("/", headers={"x-account": "u1"})
    assert r.status_code == 402 and r.json()["packages_url"] == "https://shop.example/tokens"
