"""Tokens and money enter only as JSON integers: `true`, `"1"`, `" 5 "`, `1.0`, `1e3` (and `null`
where a number is required) are 422 naming the field, and nothing in Redis changes. pydantic's lax
`int` used to accept and charge each of them.

`null` on an optional integer (input_tokens, ttl_ms, max_redemptions) means "not given", as before."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from api.middleware import TokenMeterMiddleware
from meter import InvalidInput, Meter
from tests.api.conftest import Api, make_settings, running_app
from tests.conftest import MeterFactory, redis_dump

pytestmark = pytest.mark.redis

COERCIBLE = ("true", '"1"', '" 5 "', "1.0", "1e3")  # each was accepted and charged as 1, 5 or 1000


@pytest.fixture
async def http_api(tmp_path: Any) -> AsyncIterator[Api]:
    # flusher external: nothing consumes or trims the journal, so the Redis dump is stable
    async with running_app(make_settings(tmp_path, flusher="external")) as a:
        yield a


async def dump(api: Api) -> dict[str, Any]:
    r = api.state.rt.redis
    out: dict[str, Any] = {}
    async for key in r.scan_iter(match=f"{api.settings.key_prefix}:*", count=1000):
        kind = await r.type(key)
        out[key] = {"hash": r.hgetall, "stream": r.xlen, "zset": lambda k: r.zrange(k, 0, -1, withscores=True),
                    "string": r.get}.get(kind, r.type)(key)
        out[key] = await out[key]
    return out


def body_with(fields: dict[str, Any], field: str, raw: str) -> bytes:
    """A JSON object with `field` set to the raw JSON text `raw` (1e3 must stay 1e3 on the wire)."""
    parts = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in fields.items() if k != field]
    parts.append(f'"{field}": {raw}')
    return ("{" + ", ".join(parts) + "}").encode()


async def test_every_integer_field_refuses_coercible_values(http_api: Api) -> None:
    api = http_api
    svc = {**api.service(), "content-type": "application/json"}
    acct = f"si-{uuid.uuid4().hex[:6]}"
    assert (await api.client.post("/api/v1/meter/accounts", json={"account_id": acct}, headers=svc)).status_code == 201
    r = await api.client.post("/api/v1/meter/reserve", json={"account_id": acct, "tokens": 50}, headers=svc)
    hold = r.json()["hold_id"]
    admin = f"/api/v1/admin/accounts/{acct}"
    # (path, a valid body, its integer fields, which of them are required)
    endpoints: list[tuple[str, dict[str, Any], tuple[str, ...], tuple[str, ...]]] = [
        ("/api/v1/meter/debit", {"account_id": acct, "tokens": 3, "input_tokens": 1, "output_tokens": 2},
         ("tokens", "input_tokens", "output_tokens"), ("tokens",)),
        ("/api/v1/meter/reserve", {"account_id": acct, "tokens": 3, "ttl_ms": 60_000}, ("tokens", "ttl_ms"),
         ("tokens",)),
        ("/api/v1/meter/settle", {"account_id": acct, "hold_id": hold, "actual_tokens": 3, "input_tokens": 1,
                                  "output_tokens": 2}, ("actual_tokens", "input_tokens", "output_tokens"),
         ("actual_tokens",)),
        (f"{admin}/grants", {"tokens": 5, "reason": "test"}, ("tokens",), ("tokens",)),
        (f"{admin}/adjustments", {"tokens": 5, "reason": "test"}, ("tokens",), ("tokens",)),
        (f"{admin}/refunds", {"tokens": 5, "reason": "test"}, ("tokens",), ("tokens",)),
        ("/api/v1/admin/promo-codes", {"code": f"SI{uuid.uuid4().hex[:6]}", "bonus_tokens": 5,
                                       "max_redemptions": 3}, ("bonus_tokens", "max_redemptions"),
         ("bonus_tokens",)),
    ]
    before = await dump(api)
    tried = 0
    for path, valid, fields, required in endpoints:
        for field in fields:
            for raw in (*COERCIBLE, *(("null",) if field in required else ())):
                r = await api.client.post(path, content=body_with(valid, field, raw), headers=svc)
                assert r.status_code == 422, (path, field, raw, r.text)
                assert r.json()["error"] == "invalid_input" and r.json()["field"] == field, (path, field, raw)
                tried += 1
    assert tried == 72
    assert await dump(api) == before
    # the valid bodies themselves are accepted (so the 422s above were the values); the promo code
    # is created now, so none of the refused bodies created it
    for path, valid, *_ in (endpoints[0], endpoints[3], endpoints[6]):
        r = await api.client.post(path, json=valid, headers=svc)
        assert r.status_code in (200, 201), (path, r.text)


@pytest.mark.parametrize("tokens", [True, False, 1.0, "1", " 5 ", None])
async def test_the_library_refuses_non_integers(backend: str, make_meter: MeterFactory, tokens: Any) -> None:
    meter = await make_meter(backend)
    await meter.open_account("u1")
    before = await redis_dump(meter)
    calls = [lambda: meter.debit("u1", tokens), lambda: meter.reserve("u1", tokens),
             lambda: meter.credit("u1", tokens)]
    if tokens is not None:  # input_tokens=None means "not given"
        calls.append(lambda: meter.debit("u1", 1, input_tokens=tokens))
    for call in calls:
        with pytest.raises(InvalidInput) as err:
            await call()
        assert err.value.field in ("tokens", "input_tokens")
    assert await redis_dump(meter) == before


@pytest.mark.parametrize("tokens", [True, 1.0, "1", None])
async def test_the_middleware_refuses_non_integers(backend: str, make_meter: MeterFactory, tokens: Any) -> None:
    """A tokens(scope) callable that returns a non-integer is a 422 naming tokens; the app never runs."""
    meter: Meter = await make_meter(backend)
    await meter.open_account("u1")
    ran: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        ran.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    wrapped = TokenMeterMiddleware(app, meter=meter, account=lambda s: "u1", tokens=lambda s: tokens)
    before = await redis_dump(meter)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=wrapped), base_url="http://t") as client:
        r = await client.get("/x")
    assert r.status_code == 422 and r.json()["field"] == "tokens" and ran == []
    assert await redis_dump(meter) == before
