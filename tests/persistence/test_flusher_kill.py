"""Chaos: 100,000 debits while the flusher process is SIGKILLed every 2 s and restarted."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
from redis.exceptions import ResponseError
from sqlalchemy import func, select, text

from persistence.db import Database
from persistence.models import TokenTransaction
from persistence.reconcile import reconcile
from tests.conftest import MeterFactory
from tests.processes import start_process, stop_process

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow,
              pytest.mark.usefixtures("real_redis")]

DEBITS = 100_000
ACCOUNTS = 50
KILL_EVERY_S = 2.0


def start_flusher(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return start_process([sys.executable, "-m", "api.cli", "flusher"], env=env)


async def test_flusher_killed_every_2s_loses_and_duplicates_nothing(make_meter: MeterFactory,
                                                                    pg_database: str) -> None:
    meter = await make_meter("redis", hold_ttl_ms=60_000)
    redis = meter.store.redis  # type: ignore[attr-defined]
    db = Database(pg_database)
    async with db.engine.begin() as conn:
        await conn.execute(text("TRUNCATE token_transactions, token_balances"))
    # The default settings (batch, claim time, consumer name): a restarted flusher takes the same
    # stable name and re-reads its predecessor's pending entries at once, with no claim needed.
    env = {**os.environ, "REDIS_URL": "redis://127.0.0.1:6379/0", "DATABASE_URL": pg_database,
           "TOKENMETER_KEY_PREFIX": meter.prefix}
    for name in ("TOKENMETER_FLUSHER_CLAIM_IDLE_MS", "TOKENMETER_FLUSHER_BATCH", "TOKENMETER_FLUSHER_CONSUMER"):
        env.pop(name, None)
    accounts = [f"user-{i}" for i in range(ACCOUNTS)]
    for a in accounts:
        await meter.open_account(a, plan="pro")
    proc = start_flusher(env)
    kills = 0
    stop_killer = asyncio.Event()

    async def killer() -> None:
        nonlocal proc, kills
        while not stop_killer.is_set():
            await asyncio.sleep(KILL_EVERY_S)
            proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(proc.wait)
            kills += 1
            proc = start_flusher(env)

    killing = asyncio.create_task(killer())
    try:
        allowed: list[str] = []
        queue = list(range(DEBITS))

        async def client() -> None:
            while queue:
                k = queue.pop()
                d = await meter.debit(accounts[k % ACCOUNTS], 1 + k % 5, agent="code", model="haiku")
                if d.allowed:
                    assert d.transaction_id is not None
                    allowed.append(d.transaction_id)

        await asyncio.gather(*(client() for _ in range(200)))
        await asyncio.sleep(KILL_EVERY_S * 1.5)  # at least one more kill while it catches up
        stop_killer.set()
        await killing
        deadline = time.monotonic() + 120
        expected = len(allowed) + ACCOUNTS  # the debits and the welcome allowances
        while time.monotonic() < deadline:
            async with db.sessions() as s:
                count = (await s.execute(select(func.count()).select_from(TokenTransaction))).scalar_one()
            try:
                pending = sum([(await redis.xpending(k, "tm-flusher"))["pending"] for k in streams(meter)])
            except ResponseError:  # NOGROUP: the restarted flusher has not created its groups yet
                pending = -1
            if count >= expected and pending == 0:
                break
            await asyncio.sleep(0.5)
    finally:  # however the test ends: no flusher left running
        stop_killer.set()
        killing.cancel()
        with contextlib.suppress(BaseException):
            await killing
        await asyncio.to_thread(stop_process, proc)
    assert kills >= 3
    assert len(allowed) == DEBITS  # pro plan: 5,000 requests a day, 250,000 tokens: all fit
    async with db.sessions() as s:
        ids = list((await s.execute(select(TokenTransaction.transaction_id).where(
            TokenTransaction.transaction_type == "usage"))).scalars())
    assert len(ids) == len(set(ids)) == len(allowed)  # no duplicates
    assert set(ids) == set(allowed)  # nothing missing, nothing invented
    assert sum([(await redis.xpending(k, "tm-flusher"))["pending"] for k in streams(meter)]) == 0
    checks = await reconcile(redis, db, shards=meter.shards, prefix=meter.prefix)
    assert len(checks) == ACCOUNTS and all(c.ok and c.unflushed == 0 for c in checks), [
        c for c in checks if not c.ok]
    await db.close()


def streams(meter: Any) -> list[str]:
    from meter import keys as keyspace

    return [keyspace.journal_key(s, meter.prefix) for s in range(meter.shards)]
