"""The brief's Quick Start over HTTP, every error status, and who may see what."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal

import pytest

from tests.api.conftest import Api

pytestmark = pytest.mark.redis


async def wait_for_transactions(api: Api, headers: dict[str, str], n: int) -> list[dict[str, object]]:
    for _ in range(100):
        await api.flush()
        items = (await api.client.get("/api/v1/tokens/transactions?limit=100", headers=headers)).json()
        if len(items) >= n:
            return list(items)
        await asyncio.sleep(0.05)
    raise AssertionError(f"expected {n} transactions, got {len(items)}")


async def test_quick_start(api: Api) -> None:
    user, auth = await api.register("asha@example.com")
    bal = (await api.client.get("/api/v1/tokens/balance", headers=auth)).json()
    assert (bal["remaining_tokens"], bal["monthly_allowance"], bal["monthly_remaining"]) == (10_000, 10_000, 10_000)

    r = await api.client.post("/api/v1/tokens/redeem-code", json={"promo_code": "WELCOME2024"}, headers=auth)
    assert r.status_code == 200, r.text
    assert r.json() == {"message": "Promo code redeemed successfully!", "bonus_tokens": 10_000,
                        "new_balance": 20_000, "transaction_id": r.json()["transaction_id"]}
    again = await api.client.post("/api/v1/tokens/redeem-code", json={"promo_code": "WELCOME2024"}, headers=auth)
    assert again.status_code == 409 and again.json()["error"] == "already_redeemed"

    project = (await api.client.post("/api/v1/projects", json={"title": "Library system"}, headers=auth)).json()
    run = await api.client.post(f"/api/v1/projects/{project['id']}/execute", headers=auth)
    assert run.status_code == 200, run.text
    out = run.json()
    assert [a["agent"] for a in out["agents"]] == ["idea", "srs", "code", "uml", "report", "ppt", "viva"]
    assert out["total_tokens"] == sum(a["tokens_used"] for a in out["agents"])
    assert out["remaining_tokens"] == 20_000 - out["total_tokens"]
    for a in out["agents"]:  # the simulated runner reports 70-95% of each estimate
        assert a["estimated_tokens"] * 70 // 100 <= a["tokens_used"] <= a["estimated_tokens"] * 95 // 100

    items = await wait_for_transactions(api, auth, 1 + 1 + 7 * 2)  # welcome, promo, 7 x (hold, settle)
    usage = [i for i in items if i["type"] == "usage"]
    assert sorted(i["agent"] for i in usage) == sorted(a["agent"] for a in out["agents"])
    code = next(i for i in usage if i["agent"] == "code")
    assert code["description"] == "Token usage for CodeAgent" and code["tokens"] < 0
    bonus = next(i for i in items if i["type"] == "bonus")
    assert (bonus["tokens"], bonus["description"]) == (10_000, "Promo code: WELCOME2024")

    stats = (await api.client.get("/api/v1/tokens/analytics", headers=auth)).json()
    assert stats["total_tokens_used"] == out["total_tokens"]
    assert stats["agent_usage_breakdown"] == {a["agent"]: a["tokens_used"] for a in out["agents"]}
    assert set(stats["model_usage_breakdown"]) == {"haiku", "sonnet"}
    assert sum(stats["model_usage_breakdown"].values()) == out["total_tokens"]
    usd_micros = stats["estimated_cost"]["usd_micros"]
    inr = stats["estimated_cost"]["inr_paise"]  # summed per transaction, each rounded to the paisa
    assert usd_micros > 0 and abs(inr - (usd_micros * 8300 + 500_000) // 1_000_000) <= 7
    assert Decimal(str(stats["estimated_cost"]["inr"])) == Decimal(stats["estimated_cost"]["inr_paise"]) / 100
    assert stats["average_tokens_per_request"] == round(out["total_tokens"] / 7, 2)
    assert sum(stats["usage_per_day"].values()) == out["total_tokens"]

    pk = (await api.client.get("/api/v1/tokens/packages")).json()
    assert [(p["id"], p["tokens"], p["most_popular"]) for p in pk["packs"]] == [
        ("starter", 50_000, False), ("pro", 200_000, True), ("unlimited", 1_000_000, False)]
    assert [(p["id"], p["monthly_tokens"]) for p in pk["plans"]] == [("free", 10_000), ("basic", 50_000),
                                                                      ("pro", 250_000)]
    assert user.startswith("u_")


async def test_login(api: Api) -> None:
    user, _ = await api.register("ravi@example.com", "a-long-password")
    ok = await api.client.post("/api/v1/auth/login", json={"email": "RAVI@example.com", "password": "a-long-password"})
    assert ok.status_code == 200 and ok.json()["user_id"] == user
    bad = await api.client.post("/api/v1/auth/login", json={"email": "ravi@example.com", "password": "wrong-password"})
    assert bad.status_code == 401
    dup = await api.client.post("/api/v1/auth/register",
                                json={"email": "ravi@example.com", "password": "another-long-one"})
    assert dup.status_code == 409 and dup.json()["field"] == "email"


async def test_execute_without_enough_tokens_is_402_with_the_brief_body(api: Api) -> None:
    _, auth = await api.register()
    project = (await api.client.post("/api/v1/projects", json={"title": "Big"}, headers=auth)).json()
    r = await api.client.post(f"/api/v1/projects/{project['id']}/execute", headers=auth)
    assert r.status_code == 402
    assert r.json() == {"error": "Insufficient tokens", "message": "Need 10000 more tokens. Current balance: 10000",
                        "required": 20_000, "available": 10_000, "shortage": 10_000,
                        "packages_url": "/api/v1/tokens/packages"}
    assert (await api.client.get("/api/v1/tokens/balance", headers=auth)).json()["remaining_tokens"] == 10_000


async def test_error_statuses(api: Api) -> None:
    svc = api.service()
    await api.client.post("/api/v1/meter/accounts", json={"account_id": "e1"}, headers=svc)

    async def debit(body: dict[str, object], **headers: str) -> object:
        return await api.client.post("/api/v1/meter/debit", json=body, headers={**svc, **headers})

    r = await debit({"account_id": "e1", "tokens": 8_193})
    assert r.status_code == 422 and r.json()["field"] == "tokens" and "8192" in r.json()["message"]
    r = await debit({"account_id": "e1", "tokens": "many"})
    assert r.status_code == 422 and r.json()["field"] == "tokens"
    r = await debit({"account_id": "e1", "tokens": 1.5})
    assert r.status_code == 422 and r.json()["field"] == "tokens"
    r = await debit({"account_id": "e 1", "tokens": 1})
    assert r.status_code == 422 and r.json()["field"] == "account_id"
    r = await debit({"account_id": "e1", "tokens": 1, "agent": "no pe"})
    assert r.status_code == 422 and r.json()["field"] == "agent"
    r = await debit({"tokens": 1})
    assert r.status_code == 422 and r.json()["field"] == "account_id"
    r = await api.client.post("/api/v1/meter/debit", content=b"{not json",
                              headers={**svc, "content-type": "application/json"})
    assert r.status_code == 422
    r = await debit({"account_id": "ghost", "tokens": 1})
    assert r.status_code == 404 and r.json()["error"] == "unknown_account"
    assert (await debit({"account_id": "e1", "tokens": 10}, **{"Idempotency-Key": "i-1"})).status_code == 200
    r = await debit({"account_id": "e1", "tokens": 11}, **{"Idempotency-Key": "i-1"})
    assert r.status_code == 409 and r.json()["error"] == "idempotency_conflict"
    r = await api.client.post("/api/v1/meter/settle", json={"account_id": "e1", "hold_id": "999", "actual_tokens": 5},
                              headers=svc)
    assert r.status_code == 404 and r.json()["error"] == "unknown_hold"
    for _ in range(5):
        assert (await debit({"account_id": "e1", "tokens": 1_990})).status_code == 200
    r = await debit({"account_id": "e1", "tokens": 100})
    assert r.status_code == 402
    body = r.json()
    assert (body["allowed"], body["required"], body["available"], body["shortage"]) == (False, 100, 40, 60)
    assert body["packages_url"] == "/api/v1/tokens/packages" and r.headers["X-Tokens-Remaining"] == "40"
    await api.client.post("/api/v1/meter/accounts", json={"account_id": "e2"}, headers=svc)
    for _ in range(100):  # the free plan's daily cap
        assert (await debit({"account_id": "e2", "tokens": 1})).status_code == 200
    r = await debit({"account_id": "e2", "tokens": 1})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    assert r.json()["reason"] == "daily_cap" and r.headers["RateLimit-Remaining"] == "0"
    assert (await api.client.post("/api/v1/meter/debit", json={"account_id": "e1", "tokens": 1})).status_code == 401
    r = await api.client.post("/api/v1/meter/debit", json={"account_id": "e1", "tokens": 1},
                              headers={"Authorization": "Bearer tmk_nope_nope"})
    assert r.status_code == 401
    assert (await api.client.get("/api/v1/tokens/balance")).status_code == 401
    r = await api.client.get("/api/v1/tokens/balance", headers={"Authorization": "Bearer x.y.z"})
    assert r.status_code == 401


async def test_scopes_and_key_lifecycle(api: Api) -> None:
    r = await api.client.post("/api/v1/admin/api-keys", json={"name": "gw", "scopes": ["meter"]}, headers=api.service())
    assert r.status_code == 201
    key, key_id = r.json()["key"], r.json()["id"]
    meter_key = {"X-API-Key": key}
    r = await api.client.post("/api/v1/meter/accounts", json={"account_id": "k1"}, headers=meter_key)
    assert r.status_code == 201
    r = await api.client.post("/api/v1/admin/accounts/k1/grants", json={"tokens": 5, "reason": "x"}, headers=meter_key)
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    r = await api.client.get("/api/v1/admin/api-keys", headers=api.service())
    assert all("key" not in k for k in r.json()) and any(k["id"] == key_id for k in r.json())
    assert (await api.client.delete(f"/api/v1/admin/api-keys/{key_id}", headers=api.service())).status_code == 200
    r = await api.client.post("/api/v1/meter/accounts", json={"account_id": "k2"}, headers=meter_key)
    assert r.status_code == 401
    r = await api.client.post("/api/v1/admin/accounts/k1/grants", headers=api.service(),
                              json={"tokens": 500, "bucket": "premium", "reason": "support credit"})
    assert r.status_code == 200 and r.json()["remaining_tokens"] == 10_500


async def test_a_user_sees_only_their_own_data(api: Api) -> None:
    a, auth_a = await api.register()
    b, auth_b = await api.register()
    await api.client.post("/api/v1/tokens/redeem-code", json={"promo_code": "LAUNCH50"}, headers=auth_a)
    await api.flush()
    assert (await api.client.get("/api/v1/tokens/balance", headers=auth_b)).json()["remaining_tokens"] == 10_000
    items_b = (await api.client.get("/api/v1/tokens/transactions", headers=auth_b)).json()
    assert items_b and all(i["transaction_id"].startswith(f"{b}:") for i in items_b)
    assert (await api.client.get("/api/v1/tokens/analytics", headers=auth_b)).json()["total_tokens_added"] == 10_000
    project = (await api.client.post("/api/v1/projects", json={"title": "A's"}, headers=auth_a)).json()
    assert (await api.client.post(f"/api/v1/projects/{project['id']}/execute", headers=auth_b)).status_code == 404
    assert a != b


async def test_balance_stream_pushes_changes(tmp_path: object) -> None:
    """Over a real socket (httpx's in-process transport buffers whole responses)."""
    import socket

    import httpx
    import uvicorn

    from api.app import create_app
    from tests.api.conftest import make_settings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = make_settings(tmp_path)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    serving = asyncio.create_task(server.serve())
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            for _ in range(100):
                if server.started:
                    break
                await asyncio.sleep(0.05)
            reg = await client.post("/api/v1/auth/register", json={"email": "s@example.com", "password": "p" * 10})
            auth = {"Authorization": f"Bearer {reg.json()['access_token']}"}
            seen: list[dict[str, object]] = []

            async def listen() -> None:
                async with client.stream("GET", "/api/v1/tokens/stream", headers=auth) as r:
                    assert r.headers["content-type"].startswith("text/event-stream")
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            seen.append(json.loads(line[6:]))
                            if len(seen) == 2:
                                return

            task = asyncio.create_task(listen())
            await asyncio.sleep(0.4)
            r = await client.post("/api/v1/tokens/redeem-code", json={"promo_code": "BETA100"}, headers=auth)
            assert r.status_code == 200
            await asyncio.wait_for(task, 5)  # pushed within a second of the change (polling every 250 ms)
            assert [x["remaining_tokens"] for x in seen] == [10_000, 110_000]
    finally:
        server.should_exit = True
        await serving
        if settings.redis_url:
            import redis.asyncio as aredis

            client = aredis.Redis.from_url(settings.redis_url)
            keys = [k async for k in client.scan_iter(match=f"{settings.key_prefix}:*")]
            if keys:
                await client.delete(*keys)
            await client.aclose()
