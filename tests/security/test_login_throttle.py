"""Finding 3: login throttling. 10 failed logins in 15 min lock the account (whatever address
the guesses come from) and the address (whatever accounts it guesses at): 429 with Retry-After,
and each further lockout lasts twice as long. An unknown email costs a password check too."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from api import security
from api.auth_limits import login_subjects
from api.settings import Settings
from tests.api.conftest import Api, make_settings, running_app
from tests.conftest import DATABASES

PASSWORD = "a-fine-long-password"
LIMITS = {name: Settings.model_fields[name].default for name in (
    "login_max_failures", "login_failure_window_s", "login_lockout_s", "login_lockout_max_s")}


@pytest.fixture(params=DATABASES)
async def api(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Api]:
    db = {"database_url": request.getfixturevalue("pg_database")} if request.param == "postgres" else {}
    async with running_app(make_settings(tmp_path, **LIMITS, **db)) as a:
        yield a


@contextlib.asynccontextmanager
async def client_from(api: Api, address: str) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=api.app, client=(address, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://tokenmeter.test") as client:
        yield client


async def login(api: Api, email: str, password: str, address: str) -> httpx.Response:
    async with client_from(api, address) as client:
        return await client.post("/api/v1/auth/login", json={"email": email, "password": password})


async def user(api: Api) -> str:
    email = f"login-{uuid.uuid4().hex[:10]}@example.com"
    await api.register(email, PASSWORD)
    return email


async def test_an_account_is_locked_after_ten_failures_from_anywhere(api: Api) -> None:
    email = await user(api)
    limit = api.settings.login_max_failures
    for i in range(limit):  # a distributed guesser: a new address each time
        assert (await login(api, email, f"guess-{i}-wrong", f"198.51.100.{i}")).status_code == 401
    locked = await login(api, email, PASSWORD, "203.0.113.50")  # even the right password, from elsewhere
    assert locked.status_code == 429 and locked.json()["error"] == "too_many_attempts"
    first = int(locked.headers["Retry-After"])
    assert first == api.settings.login_lockout_s

    # The lockout runs out (its key expires; removed here instead of waiting), ten more wrong
    # guesses: the next lockout is twice as long.
    account_keys, _ = login_subjects(email, "203.0.113.50", api.settings.key_prefix)
    await api.state.rt.redis.delete(account_keys.lockout)
    assert (await login(api, email, PASSWORD, "203.0.113.51")).status_code == 200  # free again
    for i in range(limit):
        assert (await login(api, email, f"again-{i}-wrong", f"192.0.2.{i}")).status_code == 401
    await api.state.rt.redis.delete(account_keys.lockout)
    for i in range(limit):
        assert (await login(api, email, f"third-{i}-wrong", f"192.0.2.{100 + i}")).status_code == 401
    again = await login(api, email, PASSWORD, "203.0.113.52")
    assert again.status_code == 429
    assert int(again.headers["Retry-After"]) == min(2 * first, api.settings.login_lockout_max_s) > first


async def test_an_address_is_locked_after_ten_failures_on_any_accounts(api: Api) -> None:
    victim = await user(api)
    limit = api.settings.login_max_failures
    for i in range(limit):  # one address trying one password on many accounts
        target = victim if i == 0 else f"someone-{uuid.uuid4().hex[:8]}@example.com"
        assert (await login(api, target, "Summer-2026!", "198.51.100.77")).status_code == 401
    r = await login(api, victim, PASSWORD, "198.51.100.77")
    assert r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= api.settings.login_lockout_max_s
    assert (await login(api, victim, PASSWORD, "198.51.100.78")).status_code == 200  # the account is fine


async def test_success_clears_the_account_count(api: Api) -> None:
    email = await user(api)
    for _ in range(3):
        for i in range(api.settings.login_max_failures - 1):
            assert (await login(api, email, f"typo-{i}", f"192.0.2.{i}")).status_code == 401
        assert (await login(api, email, PASSWORD, "192.0.2.250")).status_code == 200


async def test_an_unknown_email_costs_a_password_check(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    checked: list[str | None] = []
    original = security.verify_password

    def counting(password: str, stored: str | None) -> bool:
        checked.append(stored)
        return original(password, stored)

    monkeypatch.setattr(security, "verify_password", counting)
    r = await login(api, f"nobody-{uuid.uuid4().hex[:8]}@example.com", PASSWORD, "192.0.2.1")
    assert r.status_code == 401
    assert len(checked) == 1 and (checked[0] or "").startswith("scrypt$16384$")  # a real hash's cost
    email = await user(api)
    r = await login(api, email, "not-the-password", "192.0.2.1")
    assert r.status_code == 401 and len(checked) == 2 and checked[1] != checked[0]
