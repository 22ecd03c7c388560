"""HTTP fixtures: the real app (create_app) on a fresh key prefix and database, driven in-process
through httpx's ASGI transport with the lifespan running (so the in-process flusher runs too).

Redis: the real server when reachable (required with CI=true), else the embedded fakeredis.
Database: a SQLite file per test, or the run's Postgres database (param `postgres`)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from api.app import create_app
from api.settings import Settings
from tests.conftest import REAL_REDIS, REDIS_URL

MASTER_KEY = "test-master-key-0123456789"


class Api:
    """A running app plus an HTTP client and helpers for the common flows."""

    def __init__(self, app: Any, client: httpx.AsyncClient, settings: Settings) -> None:
        self.app, self.client, self.settings = app, client, settings

    @property
    def state(self) -> Any:
        return self.app.state.tm

    async def register(self, email: str | None = None, password: str = "s3cret-pass") -> tuple[str, dict[str, str]]:
        email = email or f"{uuid.uuid4().hex[:8]}@example.com"
        r = await self.client.post("/api/v1/auth/register", json={"email": email, "password": password})
        assert r.status_code == 201, r.text
        body = r.json()
        return body["user_id"], {"Authorization": f"Bearer {body['access_token']}"}

    async def add_account_row(self, account_id: str) -> None:
        """The accounts row a user token needs (tokens of deleted accounts are refused), for
        helpers that make users without the slow registration."""
        from persistence.models import Account

        async with self.state.rt.db.sessions() as session, session.begin():
            session.add(Account(id=account_id, email=None, password_hash=None, plan="free", is_admin=False))

    def service(self, key: str = MASTER_KEY) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    async def flush(self) -> None:
        """Drain the journal into the database now (the in-process flusher also runs)."""
        await self.state.rt.flusher(consumer="test-drain").drain()


@contextlib.asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[Api]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tokenmeter.test") as client:
            yield Api(app, client, settings)
        rt = app.state.tm.rt
        if settings.redis_url:
            keys = [k async for k in rt.redis.scan_iter(match=f"{settings.key_prefix}:*", count=1000)]
            for i in range(0, len(keys), 500):
                await rt.redis.delete(*keys[i:i + 500])


def make_settings(tmp_path: Any, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "redis_url": REDIS_URL if REAL_REDIS else None,
        "database_url": f"sqlite:///{tmp_path / 'api.sqlite3'}",
        "key_prefix": f"tmapi{uuid.uuid4().hex[:8]}",
        "master_key": MASTER_KEY,
        "jwt_secret": "test-jwt-secret-" + uuid.uuid4().hex,
        "flusher_block_ms": 20,
        "redis_timeout_ms": 2000,
        "redis_connect_timeout_ms": 2000,
        # generous auth limits: many tests register and log in from the one test address (the
        # limits' own tests in tests/security set them back)
        "register_per_address": 1_000_000, "register_global": 1_000_000, "login_max_failures": 1_000_000,
    }
    base.update(overrides)
    return Settings(**base)


@pytest.fixture
async def api(tmp_path: Any) -> AsyncIterator[Api]:
    async with running_app(make_settings(tmp_path)) as a:
        yield a
