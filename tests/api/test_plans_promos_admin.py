"""Plans, promo codes that cannot be double-spent, and admin changes in the history."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest

from api.payments import sign
from api.security import issue_token
from api.state import payments_of
from meter import FakeClock
from meter._clock import month_end_ms, month_index
from tests.api.conftest import Api, make_settings, running_app
from tests.conftest import DATABASES

pytestmark = pytest.mark.redis


@pytest.fixture(params=DATABASES)
async def dbapi(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    """The app on SQLite or on the run's Postgres database."""
    overrides = {}
    if request.param == "postgres":
        overrides["database_url"] = request.getfixturevalue("pg_database")
    async with running_app(make_settings(tmp_path, **overrides)) as a:
        yield a


async def quick_user(api: Api, plan: str = "free") -> tuple[str, dict[str, str]]:
    """An account with a token, without the (deliberately slow) password hash."""
    account = f"u_{uuid.uuid4().hex[:16]}"
    await api.state.rt.meter.open_account(account, plan=plan)
    await api.add_account_row(account)
    token = issue_token(api.state.jwt_secret, account, 3600)
    return account, {"Authorization": f"Bearer {token}"}


async def create_code(api: Api, **fields: Any) -> str:
    code = f"RACE{uuid.uuid4().hex[:8].upper()}"
    r = await api.client.post("/api/v1/admin/promo-codes", headers=api.service(),
                              json={"code": code, "bonus_tokens": 1_000, **fields})
    assert r.status_code == 201, r.text
    return code


@pytest.mark.slow
async def test_500_concurrent_redemptions_of_a_code_capped_at_100(dbapi: Api) -> None:
    code = await create_code(dbapi, max_redemptions=100)
    users = [await quick_user(dbapi) for _ in range(500)]
    results = await asyncio.gather(*(
        dbapi.client.post("/api/v1/tokens/redeem-code", json={"promo_code": code}, headers=auth)
        for _, auth in users))
    codes = [r.status_code for r in results]
    assert codes.count(200) == 100, sorted(set(codes))
    assert set(codes) == {200, 410}
    credited = 0
    for account, _ in users:
        credited += (await dbapi.state.rt.meter.balance(account)).bonus_tokens
    assert credited == 100 * 1_000


async def test_one_account_never_redeems_a_code_twice(dbapi: Api) -> None:
    code = await create_code(dbapi)
    account, auth = await quick_user(dbapi)
    results = await asyncio.gather(*(
        dbapi.client.post("/api/v1/tokens/redeem-code", json={"promo_code": code}, headers=auth) for _ in range(5)))
    assert sorted(r.status_code for r in results) == [200, 409, 409, 409, 409]
    assert (await dbapi.state.rt.meter.balance(account)).bonus_tokens == 1_000


async def test_failed_promo_attempts_are_rate_limited(api: Api) -> None:
    _, auth = await quick_user(api)
    for i in range(5):
        r = await api.client.post("/api/v1/tokens/redeem-code", json={"promo_code": f"GUESS{i}"}, headers=auth)
        assert r.status_code == 404
    r = await api.client.post("/api/v1/tokens/redeem-code", json={"promo_code": "WELCOME2024"}, headers=auth)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0 and r.json()["error"] == "too_many_attempts"


async def test_expired_restricted_and_disabled_codes(api: Api) -> None:
    account, auth = await quick_user(api)
    expired = await create_code(api, ends_at="2020-01-01T00:00:00Z")
    for_pro = await create_code(api, plan="pro")
    disabled = await create_code(api)
    assert (await api.client.delete(f"/api/v1/admin/promo-codes/{disabled}", headers=api.service())).status_code == 200

    async def redeem(code: str) -> Any:
        return await api.client.post("/api/v1/tokens/redeem-code", json={"promo_code": code}, headers=auth)

    assert (await redeem(expired)).status_code == 410
    assert (await redeem(for_pro)).status_code == 403
    assert (await redeem(disabled)).status_code == 404
    assert (await api.state.rt.meter.balance(account)).bonus_tokens == 0


async def test_upgrade_now_and_cancel_at_the_period_boundary(api: Api) -> None:
    clock = FakeClock()
    api.state.rt.meter.clock = clock
    account, auth = await quick_user(api)
    await api.state.rt.meter.debit(account, 3_000)
    r = await api.client.post("/api/v1/plans/subscribe", json={"plan": "basic"}, headers=auth)
    assert r.status_code == 201, r.text  # a paid plan: a pending purchase, nothing changes yet
    assert (r.json()["kind"], r.json()["plan"], r.json()["amount"], r.json()["status"]) == (
        "plan", "basic", 29_900, "pending")
    assert (await api.state.rt.meter.balance(account)).plan == "free"
    checkout = json.dumps(r.json()["checkout"]["body"]).encode()  # paid through the test provider
    secret = payments_of(api.app).providers["test"].secret  # type: ignore[attr-defined]
    paid = await api.client.post("/api/v1/payments/test/complete", content=checkout, headers={
        "Content-Type": "application/json", "X-Test-Signature": sign(secret, checkout)})
    assert paid.status_code == 200 and paid.json()["effective"] == "now", paid.text
    b = await api.state.rt.meter.balance(account)
    assert (b.plan, b.monthly_remaining, b.monthly_allowance) == ("basic", 47_000, 50_000)
    r = await api.client.post("/api/v1/plans/cancel", headers=auth)
    assert (r.json()["plan"], r.json()["effective"], r.json()["pending_plan"]) == ("basic", "next_period", "free")
    clock.set(month_end_ms(month_index(clock.now_ms())))
    bal = (await api.client.get("/api/v1/tokens/balance", headers=auth)).json()
    assert (bal["plan"], bal["monthly_allowance"], bal["rollover_tokens"]) == ("free", 10_000, 23_500)
    bad = await api.client.post("/api/v1/plans/subscribe", json={"plan": "gold"}, headers=auth)
    assert bad.status_code == 422 and bad.json()["field"] == "plan"


async def test_every_admin_change_is_in_the_history(api: Api) -> None:
    account, auth = await quick_user(api)
    svc = api.service()
    base = f"/api/v1/admin/accounts/{account}"
    assert (await api.client.post(f"{base}/grants", headers=svc,
                                  json={"tokens": 5_000, "bucket": "premium", "reason": "goodwill"})).status_code == 200
    r = await api.client.post(f"{base}/adjustments", headers=svc, json={"tokens": 2_000, "bucket": "premium",
                                                                        "reason": "duplicate grant"})
    assert (r.json()["taken_tokens"], r.json()["owed_tokens"]) == (2_000, 0)
    assert (await api.client.post(f"{base}/refunds", headers=svc,
                                  json={"tokens": 700, "reason": "failed run"})).status_code == 200
    assert (await api.client.post(f"{base}/plan", headers=svc, json={"plan": "pro", "reason": "sales deal"})
            ).json()["effective"] == "now"
    await api.flush()
    items = (await api.client.get("/api/v1/tokens/transactions?limit=100", headers=auth)).json()
    described = {(i["transaction_type"], i["description"]) for i in items}
    assert {("grant", "goodwill"), ("adjustment", "duplicate grant"), ("refund", "failed run")} <= described
    assert any(t == "allowance" and "admin:master: sales deal" in d for t, d in described)
    listed = (await api.client.get("/api/v1/admin/accounts", headers=svc)).json()
    assert isinstance(listed, list)
    assert (await api.state.rt.meter.balance(account)).remaining_tokens == 250_000 + 3_000 + 700
