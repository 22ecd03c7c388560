"""Finding 11 (part): a meter-scope key could open accounts on a paid plan (pro: 250,000 tokens a
month for nothing). Only an admin-scope key may, unless `meter_open_paid_plans` allows it."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest

from tests.api.conftest import Api, make_settings, running_app
from tests.conftest import DATABASES


@pytest.fixture(params=DATABASES)
def app_with(request: pytest.FixtureRequest, tmp_path: Any) -> Callable[..., Any]:
    db = {"database_url": request.getfixturevalue("pg_database")} if request.param == "postgres" else {}

    def make(**overrides: Any) -> Any:
        return running_app(make_settings(tmp_path, **db, **overrides))

    return make


async def meter_key(api: Api) -> dict[str, str]:
    r = await api.client.post("/api/v1/admin/api-keys", json={"name": "gw", "scopes": ["meter"]},
                              headers=api.service())
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['key']}"}


async def open_account(api: Api, headers: dict[str, str], plan: str) -> tuple[str, Any]:
    account = f"gw-{uuid.uuid4().hex[:8]}"
    r = await api.client.post("/api/v1/meter/accounts", json={"account_id": account, "plan": plan}, headers=headers)
    return account, r


async def test_a_meter_key_cannot_open_a_paid_plan(app_with: Callable[..., Any]) -> None:
    async with app_with() as api:
        key = await meter_key(api)
        for plan in ("basic", "pro"):
            account, r = await open_account(api, key, plan)
            assert r.status_code == 403 and r.json()["field"] == "plan", r.text
            balance = await api.client.get(f"/api/v1/meter/accounts/{account}/balance", headers=key)
            assert balance.status_code == 404  # nothing was opened
        _, r = await open_account(api, key, "free")
        assert r.status_code == 201 and r.json()["plan"] == "free"
        _, r = await open_account(api, api.service(), "pro")  # the master key has the admin scope
        assert r.status_code == 201 and r.json()["plan"] == "pro"


async def test_a_setting_allows_it(app_with: Callable[..., Any]) -> None:
    async with app_with(meter_open_paid_plans=True) as api:
        _, r = await open_account(api, await meter_key(api), "pro")
        assert r.status_code == 201 and r.json()["plan"] == "pro"
