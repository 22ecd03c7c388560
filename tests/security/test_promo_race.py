"""Finding 10: the promo-guess limit cannot be raced. Each attempt is counted (INCR) before the
code is evaluated, so 20 parallel wrong codes get at most 5 evaluations ("unknown code" 404s);
the rest are 429 without touching the database."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from api.security import issue_token
from tests.api.conftest import Api, make_settings, running_app
from tests.conftest import DATABASES

pytestmark = pytest.mark.redis

REDEEM = "/api/v1/tokens/redeem-code"


@pytest.fixture(params=DATABASES)
async def dbapi(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Api]:
    overrides = {"database_url": request.getfixturevalue("pg_database")} if request.param == "postgres" else {}
    async with running_app(make_settings(tmp_path, **overrides)) as a:
        yield a


async def quick_user(api: Api) -> dict[str, str]:
    account = f"u_{uuid.uuid4().hex[:16]}"
    await api.add_account_row(account)  # user tokens of accounts without a row are refused
    await api.state.rt.meter.open_account(account, plan="free")
    return {"Authorization": f"Bearer {issue_token(api.state.jwt_secret, account, 3600)}"}


async def test_20_parallel_wrong_codes_get_at_most_5_evaluations(dbapi: Api) -> None:
    auth = await quick_user(dbapi)
    answers = await asyncio.gather(*(dbapi.client.post(
        REDEEM, json={"promo_code": f"GUESS{i:03d}"}, headers=auth) for i in range(20)))
    codes = [r.status_code for r in answers]
    evaluated = [r for r in answers if r.status_code == 404 and r.json()["error"] == "unknown_code"]
    assert len(evaluated) <= dbapi.settings.promo_max_failures, codes
    assert len(evaluated) == 5 and codes.count(429) == 15, codes  # every attempt got an answer
    assert all(int(r.headers["Retry-After"]) > 0 for r in answers if r.status_code == 429)
    # The window is spent: even a valid code is refused now, unevaluated.
    late = await dbapi.client.post(REDEEM, json={"promo_code": "WELCOME2024"}, headers=auth)
    assert late.status_code == 429


async def test_a_successful_redemption_does_not_use_up_an_attempt(dbapi: Api) -> None:
    auth = await quick_user(dbapi)
    for i in range(4):
        assert (await dbapi.client.post(REDEEM, json={"promo_code": f"NOPE{i}"}, headers=auth)).status_code == 404
    assert (await dbapi.client.post(REDEEM, json={"promo_code": "WELCOME2024"}, headers=auth)).status_code == 200
    assert (await dbapi.client.post(REDEEM, json={"promo_code": "NOPE9"}, headers=auth)).status_code == 404
    assert (await dbapi.client.post(REDEEM, json={"promo_code": "NOPE10"}, headers=auth)).status_code == 429
