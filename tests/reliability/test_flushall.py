"""FLUSHALL, or DEL of one journal stream, under a running flusher (a real `tokenmeter flusher`
process, and the service's in-process one): the flusher creates its consumer groups again and
keeps flushing; it does not exit (external) nor die silently (in-process). On a test-owned
redis-server: FLUSHALL must not touch anyone else's keys."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, select

from meter import Meter
from meter import keys as keyspace
from persistence import migrate
from persistence.db import Database
from persistence.models import TokenTransaction
from tests.api.conftest import make_settings, running_app
from tests.processes import start_process, stop_process
from tests.reliability.private_servers import private_redis

pytestmark = [pytest.mark.redis]

DEBITS = 20


async def _rows(db: Database) -> int:
    async with db.sessions() as s:
        return int((await s.execute(select(func.count()).select_from(TokenTransaction))).scalar_one())


async def _wait_rows(db: Database, want: int, proc: Any = None, deadline_s: float = 30.0) -> None:
    for _ in range(int(deadline_s / 0.1)):
        if await _rows(db) >= want:
            return
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the flusher exited with {proc.returncode}")
        await asyncio.sleep(0.1)
    pytest.fail(f"{await _rows(db)} rows in the ledger, {want} expected")


async def _activity(meter: Meter, accounts: list[str]) -> int:
    """Open the accounts and debit each DEBITS times: the journal entries written."""
    for a in accounts:
        await meter.open_account(a)
        for _ in range(DEBITS):
            assert (await meter.debit(a, 3)).allowed
    return len(accounts) * (1 + DEBITS)


def _names_in_shard(shard: int, shards: int, n: int, stem: str) -> list[str]:
    out: list[str] = []
    i = 0
    while len(out) < n:
        name = f"{stem}-{i}"
        if keyspace.shard_of(name, shards) == shard:
            out.append(name)
        i += 1
    return out


def _recreated() -> float:
    return REGISTRY.get_sample_value("tokenmeter_flusher_groups_recreated_total") or 0.0


async def test_external_flusher_survives_flushall_and_a_deleted_stream(tmp_path: Any) -> None:
    async with private_redis(tmp_path) as server:
        db = Database(str(tmp_path / "ledger.sqlite3"))
        await migrate.upgrade(db)
        meter = await Meter.connect(server.url, prefix="tmfa", timeout_ms=2000, connect_timeout_ms=2000)
        redis = meter.store.redis  # type: ignore[attr-defined]
        env = {**os.environ, "REDIS_URL": server.url, "DATABASE_URL": str(tmp_path / "ledger.sqlite3"),
               "TOKENMETER_KEY_PREFIX": "tmfa", "TOKENMETER_FLUSHER_BLOCK_MS": "50"}
        log = tmp_path / "flusher.log"
        with log.open("wb") as out:
            proc = start_process([sys.executable, "-m", "api.cli", "flusher", "--consumer", "fa-1"], env=env,
                                 stdout=out, stderr=out)
        try:
            expected = await _activity(meter, [f"before-{i}" for i in range(4)])
            await _wait_rows(db, expected, proc)
            await redis.flushall()  # every stream and group gone, while the flusher blocks on them
            await asyncio.sleep(0.5)
            assert proc.poll() is None, "the flusher exited after FLUSHALL: " + log.read_text()[-1500:]
            expected += await _activity(meter, [f"after-{i}" for i in range(4)])
            await _wait_rows(db, expected, proc)
            # DEL of one shard's stream only: its group is created again, the others carry on
            shard = keyspace.shard_of("after-0", meter.shards)
            await redis.delete(keyspace.journal_key(shard, "tmfa"))
            await asyncio.sleep(0.3)
            expected += await _activity(meter, _names_in_shard(shard, meter.shards, 3, "deleted"))
            await _wait_rows(db, expected, proc)
            groups = await redis.xinfo_groups(keyspace.journal_key(shard, "tmfa"))
            assert [g["name"] for g in groups] == ["tm-flusher"]
            assert proc.poll() is None
        finally:
            code = stop_process(proc)
            await meter.close()
            await db.close()
        assert code == 0, log.read_text()[-1500:]  # a clean stop on SIGTERM
        assert "creating the groups again" in log.read_text()


async def test_inprocess_flusher_survives_flushall(tmp_path: Any) -> None:
    async with private_redis(tmp_path) as server:
        settings = make_settings(tmp_path, redis_url=server.url, background_supervise_s=0.2)
        async with running_app(settings) as api:
            rt = api.state.rt
            before = _recreated()
            expected = await _activity(rt.meter, [f"before-{i}" for i in range(3)])
            await _wait_rows(rt.db, expected)
            await rt.redis.flushall()
            await asyncio.sleep(0.5)
            expected += await _activity(rt.meter, [f"after-{i}" for i in range(3)])
            await _wait_rows(rt.db, expected)  # the in-process flusher still flushes
            assert _recreated() > before
            r = await api.client.get("/readyz")
            assert r.status_code == 200 and r.json()["tasks"]["flusher"]["up"] is True
            assert r.json()["tasks"]["flusher"]["restarts"] == 0  # it recovered by itself
