"""Finding 2: a promo code is credited once per account on the database record alone, not on
the credit's idempotency key (a 24 h TTL, or gone with any Redis loss). Finding 3 (promo part):
the catalog's public codes carry a global cap, TOKENMETER_PUBLIC_PROMO_MAX_REDEMPTIONS."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import select

from api.security import issue_token
from meter import StoreUnavailable
from meter import keys as keyspace
from persistence.models import PromoCode, PromoRedemption
from tests.api.conftest import Api, make_settings, running_app
from tests.conftest import DATABASES

pytestmark = pytest.mark.redis

REDEEM = "/api/v1/tokens/redeem-code"


@pytest.fixture(params=DATABASES)
async def dbapi(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Api]:
    overrides = {"database_url": request.getfixturevalue("pg_database")} if request.param == "postgres" else {}
    async with running_app(make_settings(tmp_path, **overrides)) as a:
        yield a


async def quick_user(api: Api) -> tuple[str, dict[str, str]]:
    account = f"u_{uuid.uuid4().hex[:16]}"
    await api.add_account_row(account)  # user tokens of accounts without a row are refused
    await api.state.rt.meter.open_account(account, plan="free")
    return account, {"Authorization": f"Bearer {issue_token(api.state.jwt_secret, account, 3600)}"}


async def create_code(api: Api, bonus: int) -> str:
    """A code of this test's own (the Postgres database is shared by the run's tests)."""
    code = f"ONCE{uuid.uuid4().hex[:8].upper()}"
    r = await api.client.post("/api/v1/admin/promo-codes", headers=api.service(),
                              json={"code": code, "bonus_tokens": bonus})
    assert r.status_code == 201, r.text
    return code


async def forget_idempotency(api: Api, account: str) -> int:
    """Delete every idempotency key of the account (what the 24 h TTL or a Redis loss does)."""
    s = api.state.rt.settings
    pattern = keyspace.account_keys(account, shards=s.shards, prefix=s.key_prefix).idempotency + "*"
    keys = [k async for k in api.state.rt.redis.scan_iter(match=pattern, count=1000)]
    if keys:
        await api.state.rt.redis.delete(*keys)
    return len(keys)


async def test_a_redeemed_code_never_credits_again_after_its_idempotency_key_is_gone(dbapi: Api) -> None:
    account, auth = await quick_user(dbapi)
    code = await create_code(dbapi, 10_000)
    first = await dbapi.client.post(REDEEM, json={"promo_code": code}, headers=auth)
    assert first.status_code == 200, first.text
    assert (await dbapi.state.rt.meter.balance(account)).bonus_tokens == 10_000
    assert await forget_idempotency(dbapi, account) >= 1
    again = await dbapi.client.post(REDEEM, json={"promo_code": code.lower()}, headers=auth)
    assert (await dbapi.state.rt.meter.balance(account)).bonus_tokens == 10_000  # no second credit
    assert again.status_code == 409, again.text
    assert (again.json()["error"], again.json()["transaction_id"], again.json()["bonus_tokens"]) == (
        "already_redeemed", first.json()["transaction_id"], 10_000)
    assert (await dbapi.state.rt.meter.balance(account)).bonus_tokens == 10_000
    async with dbapi.state.rt.db.sessions() as session:
        assert (await session.get(PromoCode, code)).redemptions == 1  # type: ignore[union-attr]
        row = (await session.execute(select(PromoRedemption).where(
            PromoRedemption.account_id == account))).scalar_one()
    assert row.transaction_id == first.json()["transaction_id"]  # the credit is recorded on the row


async def test_a_failed_credit_leaves_no_redemption_and_the_retry_credits_once(dbapi: Api) -> None:
    account, auth = await quick_user(dbapi)
    code = await create_code(dbapi, 50_000)
    meter = dbapi.state.rt.meter
    real_credit = meter.credit

    async def redis_down(*args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("redis down (test)")

    meter.credit = redis_down
    try:
        failed = await dbapi.client.post(REDEEM, json={"promo_code": code}, headers=auth)
    finally:
        meter.credit = real_credit
    assert failed.status_code == 503, failed.text
    async with dbapi.state.rt.db.sessions() as session:
        assert (await session.execute(select(PromoRedemption).where(
            PromoRedemption.account_id == account))).scalar_one_or_none() is None
        assert (await session.get(PromoCode, code)).redemptions == 0  # type: ignore[union-attr]
    ok = await dbapi.client.post(REDEEM, json={"promo_code": code}, headers=auth)
    assert ok.status_code == 200, ok.text
    assert (await meter.balance(account)).bonus_tokens == 50_000


async def test_public_codes_are_capped_by_the_setting(tmp_path: Any) -> None:
    async with running_app(make_settings(tmp_path, public_promo_max_redemptions=2)) as api:
        answers = []
        for _ in range(3):
            _, auth = await quick_user(api)
            answers.append((await api.client.post(REDEEM, json={"promo_code": "BETA100"}, headers=auth)).status_code)
        assert answers == [200, 200, 410]
        async with api.state.rt.db.sessions() as session:
            caps = {c.code: c.max_redemptions for c in (await session.execute(select(PromoCode))).scalars()}
        assert caps == {"WELCOME2024": 2, "LAUNCH50": 2, "BETA100": 2}
    # A restart applies a changed setting to the codes already seeded; 0 = unlimited.
    async with running_app(make_settings(tmp_path, public_promo_max_redemptions=0)) as api:
        _, auth = await quick_user(api)
        assert (await api.client.post(REDEEM, json={"promo_code": "BETA100"}, headers=auth)).status_code == 200
        async with api.state.rt.db.sessions() as session:
            assert (await session.get(PromoCode, "BETA100")).max_redemptions is None  # type: ignore[union-attr]


async def test_the_default_cap_is_ten_thousand(tmp_path: Any) -> None:
    async with running_app(make_settings(tmp_path)) as api, api.state.rt.db.sessions() as session:
        assert (await session.get(PromoCode, "WELCOME2024")).max_redemptions == 10_000  # type: ignore[union-attr]


async def test_a_credit_whose_commit_failed_is_recorded_by_the_retry_never_made_again(dbapi: Api) -> None:
    """The credit ran, then the redemption's commit failed (the database went away): the row is
    gone, the credit stands and reaches the ledger. A retry after the idempotency key expired
    finds the credit in the ledger and records it; it does not credit again."""
    account, auth = await quick_user(dbapi)
    code = await create_code(dbapi, 30_000)
    meter = dbapi.state.rt.meter
    real_credit = meter.credit

    async def credit_then_commit_fails(*args: Any, **kwargs: Any) -> Any:
        await real_credit(*args, **kwargs)
        raise StoreUnavailable("the commit after the credit failed (test)")  # the transaction rolls back

    meter.credit = credit_then_commit_fails
    try:
        failed = await dbapi.client.post(REDEEM, json={"promo_code": code}, headers=auth)
    finally:
        meter.credit = real_credit
    assert failed.status_code == 503, failed.text
    assert (await meter.balance(account)).bonus_tokens == 30_000  # the credit stands
    await dbapi.flush()  # into the ledger
    assert await forget_idempotency(dbapi, account) >= 1  # 24 h later
    retry = await dbapi.client.post(REDEEM, json={"promo_code": code}, headers=auth)
    assert retry.status_code == 200, retry.text
    assert (await meter.balance(account)).bonus_tokens == 30_000  # not credited twice
    again = await dbapi.client.post(REDEEM, json={"promo_code": code}, headers=auth)
    assert again.status_code == 409 and again.json()["transaction_id"] == retry.json()["transaction_id"]
    async with dbapi.state.rt.db.sessions() as session:
        assert (await session.get(PromoCode, code)).redemptions == 1  # type: ignore[union-attr]
