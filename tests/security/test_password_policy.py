"""Finding 3: a minimum password strength at registration: at least 10 characters and not one of
the most common passwords (a list shipped in the package), 422 naming `password`."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from api.credentials import is_common_password
from tests.api.conftest import Api, make_settings, running_app
from tests.conftest import DATABASES


@pytest.fixture(params=DATABASES)
async def api(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Api]:
    db = {"database_url": request.getfixturevalue("pg_database")} if request.param == "postgres" else {}
    async with running_app(make_settings(tmp_path, register_per_address=2, **db)) as a:
        yield a


def email() -> str:
    return f"pw-{uuid.uuid4().hex[:10]}@example.com"


@pytest.mark.parametrize("password", [
    "password123", "Password123", "QWERTYUIOP", "1234567890", "iloveyou123",
    "short-pw1", "x" * 9,
])
async def test_weak_passwords_are_refused(api: Api, password: str) -> None:
    r = await api.client.post("/api/v1/auth/register", json={"email": email(), "password": password})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "password"


async def test_the_email_is_not_a_password(api: Api) -> None:
    address = email()
    r = await api.client.post("/api/v1/auth/register", json={"email": address, "password": address.upper()})
    assert r.status_code == 422 and r.json()["field"] == "password"


async def test_a_refused_password_costs_no_registration_and_a_good_one_passes(api: Api) -> None:
    for _ in range(3):  # more weak attempts than the address may register: none of them counts
        r = await api.client.post("/api/v1/auth/register", json={"email": email(), "password": "password1234"})
        assert r.status_code == 422
    r = await api.client.post("/api/v1/auth/register", json={"email": email(), "password": "plum-kettle-orbit"})
    assert r.status_code == 201, r.text


def test_the_shipped_list_has_a_few_hundred_entries() -> None:
    from api.credentials import _common

    assert 250 <= len(_common()) <= 1000
    assert is_common_password("LetMeIn") and not is_common_password("plum-kettle-orbit")
