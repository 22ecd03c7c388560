"""Stable consumer names: a restarted `tokenmeter flusher` (no --consumer) takes the same name,
so it re-reads what its predecessor had read but not acknowledged at once, instead of after the
claim timeout; restarts do not pile up consumer names; idle consumers with nothing pending
are removed from the groups."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from typing import Any

import pytest
from sqlalchemy import func, select

from meter import keys as keyspace
from persistence import migrate
from persistence.db import Database
from persistence.flusher import Flusher, FlusherConfig
from persistence.models import TokenTransaction
from tests.conftest import REDIS_URL, MeterFactory
from tests.processes import start_process, stop_process

pytestmark = [pytest.mark.redis, pytest.mark.usefixtures("real_redis")]

ACCOUNTS = 40
DEBITS = 25


async def _rows(db: Database) -> int:
    async with db.sessions() as s:
        return int((await s.execute(select(func.count()).select_from(TokenTransaction))).scalar_one())


async def _consumers(redis: Any, streams: list[str]) -> dict[str, int]:
    """consumer name -> pending entries, over all streams."""
    out: dict[str, int] = {}
    for stream in streams:
        for c in await redis.xinfo_consumers(stream, "tm-flusher"):
            out[c["name"]] = out.get(c["name"], 0) + int(c["pending"])
    return out


async def test_restarted_flusher_rereads_its_own_pending_entries_at_once(make_meter: MeterFactory,
                                                                         tmp_path: Any, capsys: Any) -> None:
    meter = await make_meter("redis")
    redis = meter.store.redis  # type: ignore[attr-defined]
    streams = [keyspace.journal_key(s, meter.prefix) for s in range(meter.shards)]
    db = Database(str(tmp_path / "names.sqlite3"))
    await migrate.upgrade(db)
    # A claim only after 10 minutes: within this test only an own-pending re-read can flush
    # what the killed flusher had read.
    env = {**os.environ, "REDIS_URL": REDIS_URL, "DATABASE_URL": str(tmp_path / "names.sqlite3"),
           "TOKENMETER_KEY_PREFIX": meter.prefix, "TOKENMETER_FLUSHER_CLAIM_IDLE_MS": "600000",
           "TOKENMETER_FLUSHER_BLOCK_MS": "50"}
    env.pop("TOKENMETER_FLUSHER_CONSUMER", None)
    cmd = [sys.executable, "-m", "api.cli", "flusher"]  # no --consumer: the default name
    first = start_process(cmd, env=env)
    try:
        for _ in range(300):  # up, with its groups created and its name registered
            names = await _consumers(redis, streams[:1]) if await redis.exists(streams[0]) else {}
            if names:
                break
            await asyncio.sleep(0.1)
        assert len(names) == 1, names
        (name,) = names
    finally:
        first.send_signal(signal.SIGKILL)
        stop_process(first)
    # What the killed flusher had read but not written: delivered to its name, unacknowledged.
    for i in range(ACCOUNTS):
        await meter.open_account(f"cn-{i}")
        for _ in range(DEBITS):
            await meter.debit(f"cn-{i}", 1)
    taken = await redis.xreadgroup("tm-flusher", name, {s: ">" for s in streams}, count=10_000)
    expected = sum(len(entries) for _, entries in taken)
    assert expected == ACCOUNTS * (1 + DEBITS)
    assert sum((await _consumers(redis, streams)).values()) == expected
    second = start_process(cmd, env=env)
    started = time.monotonic()
    try:
        for _ in range(600):  # written, then acknowledged (XACK follows the commit)
            if await _rows(db) >= expected and await _consumers(redis, streams) == {name: 0}:
                break
            assert second.poll() is None
            await asyncio.sleep(0.1)
        caught_up = time.monotonic() - started
        assert await _rows(db) == expected  # long before any claim could have moved them
        assert await _consumers(redis, streams) == {name: 0}  # one name after the restart
        with capsys.disabled():
            print(f"\n[stable consumer name {name!r}] {expected} entries pending on the killed flusher "
                  f"flushed {caught_up:.1f}s after the restart (claim timeout 600 s); consumers: 1")
    finally:
        stop_process(second)
        await db.close()


async def test_idle_consumers_without_pending_entries_are_removed(make_meter: MeterFactory) -> None:
    meter = await make_meter("redis")
    redis = meter.store.redis  # type: ignore[attr-defined]
    flusher = Flusher(redis, None, shards=meter.shards, prefix=meter.prefix,  # type: ignore[arg-type]
                      config=FlusherConfig(consumer="alive", consumer_idle_delete_ms=200))
    await flusher.setup()
    await meter.open_account("idle-1")
    stream = keyspace.journal_key(keyspace.shard_of("idle-1", meter.shards), meter.prefix)
    await redis.xgroup_createconsumer(stream, "tm-flusher", "ghost")  # an old name, nothing pending
    await redis.xreadgroup("tm-flusher", "busy", {stream: ">"}, count=1)  # idle, but holds an entry
    await redis.xgroup_createconsumer(stream, "tm-flusher", "alive")
    await asyncio.sleep(0.3)
    removed = await flusher.remove_idle_consumers()
    assert removed == [f"{stream}/ghost"]
    assert await _consumers(redis, [stream]) == {"alive": 0, "busy": 1}  # pending entries are never dropped
