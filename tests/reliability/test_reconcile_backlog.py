"""Reconcile warns (exit 1) on a stale backlog: journal entries older than a threshold that no
flusher has written, whether never read (no flusher running) or read and never acknowledged
(a flusher that died); none once the flusher has caught up."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

import pytest

from meter import keys as keyspace
from persistence import migrate
from persistence.db import Database
from persistence.flusher import FlusherConfig
from persistence.reconcile import format_backlog, stale_backlog
from tests.conftest import REDIS_URL, MeterFactory
from tests.reliability._redis_loss import flusher

pytestmark = [pytest.mark.redis, pytest.mark.usefixtures("real_redis")]

GROUP = FlusherConfig().group


async def test_backlog_counts_unread_and_unacknowledged_entries(make_meter: MeterFactory, tmp_path: Any) -> None:
    meter = await make_meter("redis", shards=4)
    redis = meter.store.redis  # type: ignore[attr-defined]
    for i in range(5):
        await meter.open_account(f"u{i}")
        await meter.debit(f"u{i}", 10)  # two entries each: welcome and usage
    assert await stale_backlog(redis, group=GROUP, older_than_s=3600, shards=4, prefix=meter.prefix) == []
    found = await stale_backlog(redis, group=GROUP, older_than_s=0, shards=4, prefix=meter.prefix)
    assert sum(b.unflushed for b in found) == 10  # no flusher ever ran: all unread
    assert format_backlog(found, 0).startswith("WARNING: 10 journal entries not yet in the ledger")

    db = Database(str(tmp_path / "tm.sqlite3"))
    await migrate.upgrade(db)
    try:
        f = flusher(meter, db)
        await f.setup()
        stream = keyspace.journal_key(keyspace.shard_of("u0", 4), meter.prefix)
        read = await redis.xreadgroup(GROUP, "dead-one", {stream: ">"}, count=1)  # read, never acked
        assert len(read[0][1]) == 1
        found = await stale_backlog(redis, group=GROUP, older_than_s=0, shards=4, prefix=meter.prefix)
        assert sum(b.unflushed for b in found) == 10  # 1 pending + 9 undelivered
        f.config.claim_idle_ms = 0  # take the dead consumer's entry over at once
        await f.drain()
        assert await stale_backlog(redis, group=GROUP, older_than_s=0, shards=4, prefix=meter.prefix) == []

        await meter.debit("u1", 1)
        env = {**os.environ, "REDIS_URL": REDIS_URL, "DATABASE_URL": f"sqlite:///{tmp_path / 'tm.sqlite3'}",
               "TOKENMETER_KEY_PREFIX": meter.prefix, "TOKENMETER_SHARDS": "4"}

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "api.cli", "reconcile", *args], env=env,
                                  capture_output=True, text=True, timeout=60)

        r = await asyncio.to_thread(cli, "--stale-after", "0")
        assert r.returncode == 1 and "WARNING: 1 journal entries not yet in the ledger" in r.stdout, r
        r = await asyncio.to_thread(cli, "--stale-after", "3600")
        assert r.returncode == 0 and "WARNING" not in r.stdout, r
    finally:
        await db.close()
