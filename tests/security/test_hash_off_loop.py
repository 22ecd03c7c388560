"""Finding 4: password hashing stalled the whole server (scrypt ran on the event loop). Proof
without a clock: the hash function is made to block until the test releases it; while a login
(or a registration) is stuck in it, a debit on the same app is answered."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from api import security
from tests.api.conftest import Api, make_settings, running_app
from tests.conftest import DATABASES

PASSWORD = "a-fine-long-password"
BOUND_S = 10  # only a safety bound: a blocked loop would otherwise hang the test


@pytest.fixture(params=DATABASES)
async def api(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Api]:
    db = {"database_url": request.getfixturevalue("pg_database")} if request.param == "postgres" else {}
    async with running_app(make_settings(tmp_path, **db)) as a:
        yield a


def blocking(original: Callable[..., Any], entered: threading.Event, release: threading.Event) -> Callable[..., Any]:
    def hold(*args: Any) -> Any:
        entered.set()
        release.wait(BOUND_S)
        return original(*args)

    return hold


async def debit_answers_while(api: Api, request: Any, entered: threading.Event,
                              release: threading.Event) -> None:
    account = f"gw-{uuid.uuid4().hex[:8]}"
    r = await api.client.post("/api/v1/meter/accounts", json={"account_id": account}, headers=api.service())
    assert r.status_code == 201
    stuck = asyncio.create_task(request)
    try:
        assert await asyncio.to_thread(entered.wait, BOUND_S), "the hash was never called"
        debit = await api.client.post("/api/v1/meter/debit", headers=api.service(),
                                      json={"account_id": account, "tokens": 10})
        assert debit.status_code == 200 and debit.json()["allowed"]
        assert not stuck.done(), "the debit was only answered after the password hash finished"
    finally:
        release.set()
    assert (await stuck).status_code in (200, 201)


async def test_a_debit_is_answered_while_a_login_is_hashing(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    email = f"loop-{uuid.uuid4().hex[:8]}@example.com"
    await api.register(email, PASSWORD)
    entered, release = threading.Event(), threading.Event()
    monkeypatch.setattr(security, "verify_password", blocking(security.verify_password, entered, release))
    await debit_answers_while(api, api.client.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD}),
                              entered, release)


async def test_a_debit_is_answered_while_a_registration_is_hashing(api: Api,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    entered, release = threading.Event(), threading.Event()
    monkeypatch.setattr(security, "hash_password", blocking(security.hash_password, entered, release))
    email = f"loop-{uuid.uuid4().hex[:8]}@example.com"
    await debit_answers_while(api, api.client.post("/api/v1/auth/register",
                                                   json={"email": email, "password": PASSWORD}), entered, release)
