"""Shared fixtures: every wallet test runs over each store backend (the contract suite).

Backends: `reference` (the pure-Python model), `fakeredis` (Lua in-process), and `redis` (the
real server). With CI=true the real Redis must be reachable or the run stops with an error;
locally it is used when it answers. Each meter gets its own key prefix, deleted afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis

from meter import FakeClock, JournalEntry, Meter, ReferenceStore
from meter import keys as keyspace

CI = os.environ.get("CI", "").lower() == "true"
REDIS_URL = os.environ.get("TOKENMETER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _redis_up() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


REAL_REDIS = _redis_up()
BACKENDS = ["reference", "fakeredis", *(["redis"] if REAL_REDIS or CI else [])]
LUA_BACKENDS = [b for b in BACKENDS if b != "reference"]


def pytest_sessionstart(session: pytest.Session) -> None:
    if CI and not REAL_REDIS:
        pytest.exit(f"CI=true but Redis at {REDIS_URL} is unreachable", returncode=3)


MeterFactory = Callable[..., Awaitable[Meter]]


async def _build(backend: str, prefix: str, **options: Any) -> Meter:
    if backend == "reference":
        return Meter(ReferenceStore(), prefix=prefix, **options)
    if backend == "fakeredis":
        import fakeredis

        from meter._redis_store import RedisStore

        return Meter(RedisStore(fakeredis.FakeAsyncRedis(decode_responses=True)), prefix=prefix, **options)
    # Generous timeouts: a busy CI machine must not turn into StoreUnavailable here (the
    # fail-closed tests use their own Meter with the production defaults).
    return await Meter.connect(REDIS_URL, prefix=prefix, timeout_ms=2000, connect_timeout_ms=2000, **options)


async def _cleanup(meter: Meter, prefix: str) -> None:
    client = getattr(meter.store, "redis", None)
    if client is not None:
        batch = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
        for i in range(0, len(batch), 500):
            await client.delete(*batch[i:i + 500])
    await meter.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=LUA_BACKENDS)
def lua_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def make_meter(clock: FakeClock) -> AsyncIterator[MeterFactory]:
    """`await make_meter(backend, **options)`: a Meter on a fresh key prefix, cleaned up after."""
    built: list[tuple[Meter, str]] = []

    async def factory(backend: str, **options: Any) -> Meter:
        prefix = f"tmtest{uuid.uuid4().hex[:10]}"
        options.setdefault("clock", clock)
        meter = await _build(backend, prefix, **options)
        built.append((meter, prefix))
        return meter

    yield factory
    for meter, prefix in built:
        await _cleanup(meter, prefix)


@pytest.fixture
async def meter(backend: str, make_meter: MeterFactory) -> Meter:
    return await make_meter(backend)


async def journal_of(meter: Meter, account_id: str) -> list[JournalEntry]:
    """Every journal entry of one account, oldest first."""
    key = keyspace.journal_key(keyspace.shard_of(account_id, meter.shards), meter.prefix)
    store = meter.store
    if isinstance(store, ReferenceStore):
        raw = store.journal_of(key)
    else:
        raw = [fields for _, fields in await store.redis.xrange(key)]  # type: ignore[attr-defined]
    return [JournalEntry.from_fields(f) for f in raw if f["a"] == account_id]


async def redis_dump(meter: Meter) -> dict[str, Any]:
    """Every key under the meter's prefix with its value (for 'nothing changed' checks)."""
    store = meter.store
    if isinstance(store, ReferenceStore):
        return {
            "accounts": {k: dict(v) for k, v in store.accounts.items()},
            "holds": {k: {h: x.encode() for h, x in v.items()} for k, v in store.holds.items()},
            "journals": {k: len(v) for k, v in store.journals.items()},
            "idem": dict(store.idempotency),
        }
    client = store.redis  # type: ignore[attr-defined]
    out: dict[str, Any] = {}
    async for key in client.scan_iter(match=f"{meter.prefix}:*", count=1000):
        kind = await client.type(key)
        if kind == "hash":
            out[key] = await client.hgetall(key)
        elif kind == "stream":
            out[key] = await client.xlen(key)
        elif kind == "zset":
            out[key] = await client.zrange(key, 0, -1, withscores=True)
        else:
            out[key] = await client.get(key)
    return out


# -- databases ---------------------------------------------------------------------------------

PG_ADMIN_URL = os.environ.get("TOKENMETER_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _pg_up() -> bool:
    import asyncio

    import asyncpg

    async def ping() -> bool:
        try:
            conn = await asyncpg.connect(PG_ADMIN_URL, timeout=2)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return False
        await conn.close()
        return True

    return asyncio.run(ping())


REAL_PG = _pg_up()
DATABASES = ["sqlite", *(["postgres"] if REAL_PG or CI else [])]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if CI and not REAL_PG:
        pytest.exit(f"CI=true but PostgreSQL at {PG_ADMIN_URL} is unreachable", returncode=3)


def _in_thread(make_coro: Callable[[], Any]) -> Any:
    """Run a coroutine to completion on its own loop in a worker thread (callable from a loop)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make_coro())).result()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh Postgres database for this test run (dropped afterwards); its URL."""

    import asyncpg

    if not REAL_PG:
        pytest.skip("PostgreSQL not reachable (local run only: with CI=true the session stops instead)")
    name = f"tmtest_{uuid.uuid4().hex[:10]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(PG_ADMIN_URL)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    _in_thread(lambda: admin(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    from persistence import migrate
    from persistence.db import Database

    async def setup() -> None:
        db = Database(url)
        await migrate.upgrade(db)
        await db.close()

    _in_thread(setup)
    yield url
    _in_thread(lambda: admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=DATABASES)
async def database(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Any]:
    """A migrated, empty database: a SQLite file, or the run's Postgres database truncated."""
    from sqlalchemy import text

    from persistence import migrate
    from persistence.db import Database
    from persistence.models import Base

    if request.param == "sqlite":
        db = Database(str(tmp_path / "tm.sqlite3"))
        await migrate.upgrade(db)
    else:
        db = Database(request.getfixturevalue("pg_database"))
        async with db.engine.begin() as conn:
            tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
            await conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY"))
    yield db
    await db.close()


@pytest.fixture
def real_redis() -> None:
    if not REAL_REDIS:
        pytest.skip("Redis not reachable (local run only: with CI=true the session stops instead)")
