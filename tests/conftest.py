"""Shared fixtures: every wallet test runs over each store backend (the contract suite).

Backends: `reference` (the pure-Python model), `fakeredis` (Lua in-process), and `redis` (the
real server). With CI=true the real Redis must be reachable or the run stops with an error;
locally it is used when it answers. Each meter gets its own key prefix, deleted afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
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
    return await Meter.connect(REDIS_URL, prefix=prefix, timeout_ms=2000, **options)


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
