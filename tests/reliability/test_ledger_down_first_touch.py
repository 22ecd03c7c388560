"""After a Redis restart every account is checked against the ledger at its first touch. If the
ledger cannot be read then, the call is refused with 503 `ledger_unavailable` (JSON, Retry-After),
nothing changes in Redis, and the account works again once the ledger answers; accounts already
checked keep working meanwhile."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from api.state import AppState
from meter import LedgerUnavailable
from meter import keys as keyspace
from tests.api.conftest import Api, make_settings, running_app
from tests.conftest import MeterFactory
from tests.reliability._redis_loss import forget_verified

pytestmark = [pytest.mark.redis]


async def _down(account_id: str) -> None:
    raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)")


async def _unknown_to_the_ledger(account_id: str) -> None:
    return None


async def _dump(redis: Any, prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async for key in redis.scan_iter(match=f"{prefix}:*"):
        out[str(key)] = await redis.dump(key)
    return out


async def test_first_touch_with_the_ledger_down_is_refused_and_changes_nothing(make_meter: MeterFactory) -> None:
    meter = await make_meter("redis")
    redis = meter.store.redis  # type: ignore[attr-defined]
    await meter.open_account("checked")
    await meter.open_account("unchecked")
    meter.loader = _unknown_to_the_ledger
    await meter.debit("checked", 5)  # checked now (nothing in the ledger: Redis's state stands)

    meter.loader = _down
    before = await _dump(redis, meter.prefix)
    with pytest.raises(LedgerUnavailable):
        await meter.debit("unchecked", 5, request_id="r-1")
    assert await _dump(redis, meter.prefix) == before
    assert (await meter.debit("checked", 5)).allowed  # a checked account does not need the ledger

    meter.loader = _unknown_to_the_ledger  # the ledger is back
    d = await meter.debit("unchecked", 5, request_id="r-1")
    assert d.allowed and not d.replayed and d.remaining == 10_000 - 5


async def test_over_http_it_is_a_json_503_never_a_plain_500(tmp_path: Any) -> None:
    async with running_app(make_settings(tmp_path)) as api:
        await _over_http(api)


async def _over_http(api: Api) -> None:
    state: AppState = api.state
    r = await api.client.post("/api/v1/meter/accounts", json={"account_id": "gw-1"}, headers=api.service())
    assert r.status_code == 201, r.text
    # As after a Redis restart: the shard's set of checked accounts is empty again.
    shard = keyspace.shard_of("gw-1", state.rt.settings.shards)
    await forget_verified(state.rt.redis, keyspace.live_key(shard, state.rt.settings.key_prefix))
    loader, state.rt.meter.loader = state.rt.meter.loader, _down
    try:
        for path, body in (("/api/v1/meter/debit", {"account_id": "gw-1", "tokens": 10}),
                           ("/api/v1/meter/reserve", {"account_id": "gw-1", "tokens": 10})):
            r = await api.client.post(path, json=body, headers={**api.service(), "Idempotency-Key": "k-1"})
            assert r.status_code == 503, r.text
            assert r.headers["content-type"].startswith("application/json")
            assert r.json()["error"] == "ledger_unavailable" and r.headers["retry-after"] == "1"
    finally:
        state.rt.meter.loader = loader
    r = await api.client.post("/api/v1/meter/debit", json={"account_id": "gw-1", "tokens": 10},
                              headers={**api.service(), "Idempotency-Key": "k-1"})
    assert r.status_code == 200 and r.json()["remaining_tokens"] == 10_000 - 10, r.text


async def test_an_unexpected_fault_is_a_json_500(tmp_path: Any) -> None:
    async with running_app(make_settings(tmp_path)) as api:
        async def broken(*_: Any, **__: Any) -> None:
            raise RuntimeError("a bug")

        api.state.rt.meter.balance = broken
        transport = httpx.ASGITransport(app=api.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://tokenmeter.test") as client:
            r = await client.get("/api/v1/meter/accounts/gw-1/balance", headers=api.service())
        assert r.status_code == 500 and r.json()["error"] == "internal_error", r.text
