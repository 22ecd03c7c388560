"""Finding 3: unlimited free accounts. Registrations are limited per client address and overall
(429 + Retry-After, counted in Redis under the deployment's prefix); X-Forwarded-For is believed
only from a configured proxy; one email address is one account however it is spelled."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from api.settings import Settings
from meter import keys as keyspace
from persistence.models import Account
from tests.api.conftest import Api, make_settings, running_app
from tests.conftest import DATABASES

DEFAULTS = {name: Settings.model_fields[name].default
            for name in ("register_per_address", "register_global", "register_window_s")}
PASSWORD = "a-fine-long-password"

AppFactory = Callable[..., contextlib.AbstractAsyncContextManager[Api]]


@pytest.fixture(params=DATABASES)
def make_app(request: pytest.FixtureRequest, tmp_path: Any) -> AppFactory:
    """`async with make_app(**settings) as api`: the app with the production auth limits."""
    db = {"database_url": request.getfixturevalue("pg_database")} if request.param == "postgres" else {}

    def make(**overrides: Any) -> contextlib.AbstractAsyncContextManager[Api]:
        return running_app(make_settings(tmp_path, **{**DEFAULTS, **db, **overrides}))

    return make


@contextlib.asynccontextmanager
async def client_from(api: Api, address: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client whose TCP peer address (the ASGI `client`) is `address`."""
    transport = httpx.ASGITransport(app=api.app, client=(address, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://tokenmeter.test") as client:
        yield client


async def register(client: httpx.AsyncClient, email: str | None = None,
                   headers: dict[str, str] | None = None) -> httpx.Response:
    email = email or f"reg-{uuid.uuid4().hex[:10]}@example.com"
    return await client.post("/api/v1/auth/register", json={"email": email, "password": PASSWORD},
                             headers=headers or {})


def wide(text: str) -> str:
    """The fullwidth spelling of ASCII letters (U+FF21...), which NFKC maps back."""
    return "".join(chr(ord(c) + 0xFEE0) if c.isalpha() else c for c in text)


def assert_limited(r: httpx.Response, window_s: int) -> None:
    assert r.status_code == 429, r.text
    assert r.json()["error"] == "too_many_registrations"
    assert 1 <= int(r.headers["Retry-After"]) <= window_s


async def test_registrations_per_address_are_limited(make_app: AppFactory) -> None:
    async with make_app() as api, client_from(api, "198.51.100.7") as one, \
            client_from(api, "203.0.113.9") as other:
        limit = api.settings.register_per_address
        for _ in range(limit):
            assert (await register(one)).status_code == 201
        assert_limited(await register(one), api.settings.register_window_s)
        assert (await register(other)).status_code == 201  # another address is not affected
        key = keyspace.registration_address_key("198.51.100.7", api.settings.key_prefix)
        assert api.settings.key_prefix.startswith("tmapi") and int(await api.state.rt.redis.get(key)) == limit + 1
        assert 0 < await api.state.rt.redis.ttl(key) <= api.settings.register_window_s


async def test_registrations_overall_are_limited(make_app: AppFactory) -> None:
    async with make_app(register_global=3) as api:
        for i in range(3):
            async with client_from(api, f"192.0.2.{i + 1}") as client:
                assert (await register(client)).status_code == 201
        async with client_from(api, "192.0.2.200") as client:
            assert_limited(await register(client), api.settings.register_window_s)


async def test_x_forwarded_for_is_believed_only_from_a_trusted_proxy(make_app: AppFactory) -> None:
    async with make_app(register_per_address=2) as api, client_from(api, "10.0.0.5") as client:
        for i in range(2):  # forged headers from an untrusted peer: all count against the peer
            assert (await register(client, headers={"X-Forwarded-For": f"198.51.100.{i}"})).status_code == 201
        assert_limited(await register(client, headers={"X-Forwarded-For": "198.51.100.99"}), 3600)
    async with make_app(register_per_address=2, trusted_proxies="10.0.0.0/8") as api, \
            client_from(api, "10.0.0.5") as proxy:
        for i in range(3):  # three clients behind our proxy: each has its own count
            r = await register(proxy, headers={"X-Forwarded-For": f"1.2.3.4, 198.51.100.{i}, 10.0.0.7"})
            assert r.status_code == 201, r.text
        for _ in range(2):
            assert (await register(proxy, headers={"X-Forwarded-For": "198.51.100.50"})).status_code == 201
        assert_limited(await register(proxy, headers={"X-Forwarded-For": "198.51.100.50"}), 3600)


async def test_one_email_is_one_account_however_spelled(make_app: AppFactory) -> None:
    async with make_app(register_per_address=100) as api:
        tag = uuid.uuid4().hex[:8]
        r = await register(api.client, f"Asha.{tag}@Example.COM.")
        assert r.status_code == 201, r.text
        async with api.state.rt.db.sessions() as session:
            stored = (await session.execute(select(Account.email).where(Account.id == r.json()["user_id"]))).scalar()
        assert stored == f"asha.{tag}@example.com"
        for spelling in (f"ASHA.{tag}@example.com", f"{wide('asha')}.{tag}@{wide('example.com')}",
                         f"asha.{tag}@example.com..", f"  asha.{tag}@EXAMPLE.com "):
            dup = await register(api.client, spelling)
            assert dup.status_code == 409 and dup.json()["field"] == "email", (spelling, dup.text)
        login = await api.client.post("/api/v1/auth/login",
                                      json={"email": f"{wide('ASHA')}.{tag}@example.com.", "password": PASSWORD})
        assert login.status_code == 200 and login.json()["user_id"] == r.json()["user_id"]


def test_forwarded_hops_with_ports_name_the_client() -> None:
    """Proxies that append the port (`a.b.c.d:port`, `[v6]:port`) still name the client; before,
    the walk stopped at our proxy and every client behind it shared one count."""
    from starlette.requests import Request

    from api.client_address import ClientAddresses

    def request(xff: str) -> Request:
        return Request({"type": "http", "client": ("10.0.0.5", 1234), "headers": [(b"x-forwarded-for", xff.encode())]})

    addresses = ClientAddresses("10.0.0.0/8")
    assert addresses.of(request("198.51.100.7:5555, 10.0.0.7:80")) == "198.51.100.7"
    assert addresses.of(request("[2001:db8::1]:443")) == "2001:db8::1"
    assert addresses.of(request("2001:db8::2")) == "2001:db8::2"
    assert addresses.of(request("not-an-address, 198.51.100.8")) == "198.51.100.8"
    assert ClientAddresses("").of(request("198.51.100.9")) == "10.0.0.5"  # no trusted proxy: the peer
