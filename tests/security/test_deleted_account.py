"""Finding 11 (part): a user token outlived its account. The token of a deleted account is
refused (401) once the short existence cache (`user_check_cache_s`) has run out."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import delete

from persistence.models import Account
from tests.api.conftest import Api, make_settings, running_app
from tests.conftest import DATABASES


@pytest.fixture(params=DATABASES)
def app_with(request: pytest.FixtureRequest, tmp_path: Any) -> Callable[..., Any]:
    db = {"database_url": request.getfixturevalue("pg_database")} if request.param == "postgres" else {}

    def make(**overrides: Any) -> Any:
        return running_app(make_settings(tmp_path, **db, **overrides))

    return make


async def drop_account(api: Api, account_id: str) -> None:
    async with api.state.rt.db.sessions() as session, session.begin():
        await session.execute(delete(Account).where(Account.id == account_id))


async def test_a_deleted_accounts_token_is_refused(app_with: Callable[..., Any]) -> None:
    async with app_with(user_check_cache_s=0) as api:
        user, auth = await api.register()
        assert (await api.client.get("/api/v1/tokens/balance", headers=auth)).status_code == 200
        await drop_account(api, user)
        for path in ("/api/v1/tokens/balance", "/api/v1/tokens/transactions", "/api/v1/tokens/analytics"):
            r = await api.client.get(path, headers=auth)
            assert r.status_code == 401 and r.json()["error"] == "unauthorized", (path, r.text)
        r = await api.client.post("/api/v1/projects", json={"title": "x"}, headers=auth)
        assert r.status_code == 401


async def test_the_check_is_cached_briefly(app_with: Callable[..., Any]) -> None:
    """Within the cache time a known account is not looked up again (the user endpoints stay
    cheap); the deletion is seen when the entry runs out (dropped here instead of waiting)."""
    async with app_with(user_check_cache_s=300) as api:
        user, auth = await api.register()
        assert (await api.client.get("/api/v1/tokens/balance", headers=auth)).status_code == 200
        await drop_account(api, user)
        assert (await api.client.get("/api/v1/tokens/balance", headers=auth)).status_code == 200
        api.state.auth.accounts.discard(user)
        assert (await api.client.get("/api/v1/tokens/balance", headers=auth)).status_code == 401
