"""Finding 4, the report: after Redis lost acknowledged entries that the ledger has, reconcile
says exactly what, per account (entries and tokens), and exits 1; `--repair` is a dry run that
changes nothing; `--repair --apply` loads the ledger's state into Redis (journaled, the sequence
past the ledger's last id), after which reconcile is clean."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

import pytest

from meter import FakeClock
from persistence import migrate
from persistence.db import Database
from persistence.reconcile import reconcile, repair
from tests.reliability._redis_loss import PrivateRedis, flusher, ledger_rows, loss_meter, private_redis_server

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

ACCOUNTS = ("a1", "a2")


async def _lose_the_tail(server: PrivateRedis, database: Any, clock: FakeClock) -> dict[str, int]:
    """Debits, a flush, the AOF's size; more debits (4 on a1, 6 on a2), flushed; SIGKILL, the AOF
    cut back, restart. Returns the tokens each account's lost debits took."""
    meter = await loss_meter(server.url, database, clock)
    lost = dict.fromkeys(ACCOUNTS, 0)
    try:
        for account in ACCOUNTS:
            assert await meter.open_account(account, "basic")
            assert (await meter.debit(account, 1_000)).allowed
        await flusher(meter, database).drain()
        cut = os.path.getsize(server.incr_aof())
        for account, n in zip(ACCOUNTS, (4, 6), strict=True):
            for i in range(n):
                assert (await meter.debit(account, 100 + i)).allowed
                lost[account] += 100 + i
        await flusher(meter, database).drain()
    finally:
        await meter.close()
    server.kill()
    with open(server.incr_aof(), "r+b") as aof:
        aof.truncate(cut)
    server.start()
    return lost


async def test_reconcile_reports_what_redis_lost_and_repair_loads_the_ledger(tmp_path: Any, database: Any,
                                                                           clock: FakeClock) -> None:
    async with private_redis_server(str(tmp_path)) as server:
        lost = await _lose_the_tail(server, database, clock)
        meter = await loss_meter(server.url, database, clock)
        redis = meter.store.redis  # type: ignore[attr-defined]
        try:
            checks = await reconcile(redis, database, shards=meter.shards, prefix=meter.prefix)
            got = {c.account_id: (c.ledger_ahead, c.lost_tokens, c.ok) for c in checks}
            assert got == {"a1": (4, -lost["a1"], False), "a2": (6, -lost["a2"], False)}
            status = {c.account_id: c.status for c in checks}
            assert status["a1"].startswith(f"redis lost 4 entries / {-lost['a1']} tokens")

            dump = {k: await redis.hgetall(k) for k in [meter._account_keys(a).account for a in ACCOUNTS]}
            lines = sorted(await repair(meter, checks))  # dry run
            assert lines == [f"would load a1 from the ledger (4 entries / {-lost['a1']} tokens lost); --apply to do it",
                             f"would load a2 from the ledger (6 entries / {-lost['a2']} tokens lost); --apply to do it"]
            assert {k: await redis.hgetall(k) for k in dump} == dump  # nothing written

            assert sorted(await repair(meter, checks, apply=True)) == [
                f"loaded a1 (4 entries / {-lost['a1']} tokens lost)",
                f"loaded a2 (6 entries / {-lost['a2']} tokens lost)"]
            for account, n in zip(ACCOUNTS, (4, 6), strict=True):
                assert (await meter.balance(account)).remaining_tokens == 50_000 - 1_000 - lost[account]
                d = await meter.debit(account, 1)
                assert d.transaction_id == f"{account}:{2 + n + 2}"  # past the ledger's last and the repair entry
            await flusher(meter, database).drain()
            for account, n in zip(ACCOUNTS, (4, 6), strict=True):
                rows = await ledger_rows(database, account)
                assert [r.seq for r in rows] == list(range(1, 2 + n + 3))
                assert rows[-2].transaction_type == "adjustment" and rows[-2].tokens_changed == 0
                assert rows[-2].description == f"redis lost entries 3-{2 + n}; state loaded from the ledger"
            checks = await reconcile(redis, database, shards=meter.shards, prefix=meter.prefix)
            assert [c.status for c in checks] == ["ok", "ok"]
        finally:
            await meter.close()


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_reconcile_command_exit_codes_and_repair(tmp_path: Any, clock: FakeClock, database: Any) -> None:
    path = tmp_path / "cli.sqlite3"
    db = Database(str(path))
    await migrate.upgrade(db)
    async with private_redis_server(str(tmp_path)) as server:
        try:
            await _lose_the_tail(server, db, clock)
        finally:
            await db.close()
        env = {**os.environ, "REDIS_URL": server.url, "DATABASE_URL": f"sqlite:///{path}",
               "TOKENMETER_KEY_PREFIX": "tmloss", "TOKENMETER_SHARDS": "4"}

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "api.cli", "reconcile", *args], env=env,
                                  capture_output=True, text=True, timeout=60)

        r = await asyncio.to_thread(cli)
        assert r.returncode == 1 and "redis lost 4 entries" in r.stdout and "redis lost 6 entries" in r.stdout, r
        r = await asyncio.to_thread(cli, "--repair")
        assert r.returncode == 1 and "would load a1" in r.stdout, r
        r = await asyncio.to_thread(cli, "--repair", "--apply")
        assert "loaded a1" in r.stdout and "loaded a2" in r.stdout, r
        # the repair entries are in the stream; reconcile counts them as not yet flushed: clean
        r = await asyncio.to_thread(cli, "--stale-after", "3600")
        assert r.returncode == 0 and "0 with drift" in r.stdout, r
