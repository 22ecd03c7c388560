"""PostgreSQL `stop -m immediate` under load, `tokenmeter flusher` as a real process: the flusher
waits out every phase (connection refused, "the database system is starting up", "not yet
accepting connections", connections killed mid-COPY), survives, catches up; the ledger then
holds exactly the acknowledged changes, no duplicates, and reconcile is clean."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
import urllib.request
from typing import Any

import asyncpg
import pytest
from sqlalchemy import exc as saexc
from sqlalchemy import func, select

from meter import keys as keyspace
from persistence import migrate
from persistence.db import Database, is_configuration_error, is_transient
from persistence.models import TokenTransaction
from persistence.reconcile import reconcile
from tests.conftest import REDIS_URL, MeterFactory
from tests.processes import free_port, start_process, stop_process
from tests.reliability.private_servers import private_postgres

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.usefixtures("real_redis")]

ACCOUNTS = 60  # pro plan: 5,000 requests a day each
CLIENTS = 40
MAX_DEBITS = 150_000  # a bound; the pacing below keeps the load going through the outage
REFUSING_S = 6.0  # above the flusher's 5 s backoff cap


def _wrapped(orig: BaseException) -> saexc.DBAPIError:
    return saexc.DBAPIError.instance("SELECT 1", None, orig, Exception)


@pytest.mark.parametrize("exc", [
    asyncpg.CannotConnectNowError("the database system is starting up"),
    asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    asyncpg.TooManyConnectionsError("sorry, too many clients already"),
    asyncpg.SerializationError("could not serialize access"),
    asyncpg.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.CrashShutdownError("terminating connection because of crash of another server process"),
    ConnectionRefusedError(111, "Connect call failed"),
    ConnectionResetError(104, "reset by peer"),
    saexc.OperationalError("SELECT 1", None, Exception("server closed the connection")),
    saexc.InterfaceError("SELECT 1", None, Exception("connection is closed")),
    sqlite3.OperationalError("database is locked"),
])
def test_transient_database_faults_are_recognised(exc: BaseException) -> None:
    assert is_transient(exc)
    assert is_transient(_wrapped(exc))  # however SQLAlchemy wraps it
    assert not is_configuration_error(exc)


@pytest.mark.parametrize("exc", [
    asyncpg.InvalidPasswordError("password authentication failed for user"),
    asyncpg.InvalidAuthorizationSpecificationError("role does not exist"),
    asyncpg.InvalidCatalogNameError('database "nope" does not exist'),
    saexc.ArgumentError("Could not parse SQLAlchemy URL"),
    asyncpg.UndefinedTableError('relation "token_transactions" does not exist'),  # never migrated
    sqlite3.OperationalError("no such table: token_transactions"),
    sqlite3.OperationalError("unable to open database file"),
])
def test_configuration_errors_are_not_waited_out(exc: BaseException) -> None:
    assert is_configuration_error(exc) and is_configuration_error(_wrapped(exc))
    assert not is_transient(exc) and not is_transient(_wrapped(exc))


def _scrape(port: int) -> dict[str, float]:
    """Unlabelled sample values of the flusher process's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def _count(db: Database) -> tuple[int, int]:
    async with db.sessions() as s:
        n = (await s.execute(select(func.count()).select_from(TokenTransaction))).scalar_one()
        distinct = (await s.execute(select(func.count(func.distinct(TokenTransaction.transaction_id))))).scalar_one()
    return int(n), int(distinct)


async def _pending(redis: Any, prefix: str, shards: int) -> int:
    total = 0
    for s in range(shards):
        try:
            total += (await redis.xpending(keyspace.journal_key(s, prefix), "tm-flusher"))["pending"]
        except Exception:
            return -1
    return total


@pytest.mark.parametrize("outage_s", [4.0, pytest.param(20.0, marks=pytest.mark.slow)])
async def test_flusher_survives_postgres_stop_immediate_under_load(make_meter: MeterFactory, outage_s: float,
                                                                   capsys: Any) -> None:
    meter = await make_meter("redis", hold_ttl_ms=60_000)
    redis = meter.store.redis  # type: ignore[attr-defined]
    async with private_postgres() as pg:
        url = await pg.create_database("tm")
        db = Database(url)
        await migrate.upgrade(db)
        accounts = [f"pg-{i}" for i in range(ACCOUNTS)]
        for a in accounts:
            await meter.open_account(a, plan="pro")
        metrics_port = free_port()
        env = {**os.environ, "REDIS_URL": REDIS_URL, "DATABASE_URL": url, "TOKENMETER_KEY_PREFIX": meter.prefix,
               "TOKENMETER_FLUSHER_BATCH": "1000", "TOKENMETER_FLUSHER_BLOCK_MS": "50"}
        log = pg.dir / "flusher.log"
        with log.open("wb") as out:
            proc = start_process([sys.executable, "-m", "api.cli", "flusher", "--consumer", "pg-restart",
                                  "--metrics-port", str(metrics_port)], env=env, stdout=out, stderr=out)
        allowed: list[str] = []
        stop_load = asyncio.Event()
        issued = 0

        async def client() -> None:
            nonlocal issued
            while not stop_load.is_set() and issued < MAX_DEBITS:
                issued += 1
                d = await meter.debit(accounts[issued % ACCOUNTS], 1 + issued % 7, agent="code", model="haiku")
                if d.allowed:
                    assert d.transaction_id is not None
                    allowed.append(d.transaction_id)
                await asyncio.sleep(0.01)  # ~2-3k debits/s: load, while leaving the shared cores room

        load = [asyncio.create_task(client()) for _ in range(CLIENTS)]
        try:
            for _ in range(300):  # the flusher is writing before the database goes away
                if (await _count(db))[0] > 200:
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("the flusher wrote nothing before the outage")
            await db.close()
            await asyncio.to_thread(pg.stop, "immediate")
            await asyncio.sleep(outage_s)  # connection refused; the hot path answers from Redis meanwhile
            assert proc.poll() is None, "the flusher died while PostgreSQL was down"
            # Recovery, held open longer than the flusher's backoff so it surely meets it: up,
            # but "the database system is not accepting connections" (57P03), then accepting.
            await asyncio.to_thread(pg.start, refusing=True)
            await asyncio.sleep(REFUSING_S)
            assert proc.poll() is None, "the flusher died while PostgreSQL was starting up"
            await asyncio.to_thread(pg.promote)
            restarted = time.monotonic()
            await asyncio.sleep(1.0)
            stop_load.set()
            await asyncio.gather(*load)
            expected = len(allowed) + ACCOUNTS  # every admitted debit and each welcome allowance
            caught_up = None
            for _ in range(1200):
                n, _ = await _count(db)
                if n >= expected and await _pending(redis, meter.prefix, meter.shards) == 0:
                    caught_up = time.monotonic() - restarted
                    break
                await asyncio.sleep(0.1)
            assert proc.poll() is None, "the flusher exited: " + log.read_text()[-2000:]
            assert caught_up is not None, f"not caught up: {await _count(db)} rows of {expected}"
            figures = _scrape(metrics_port)
            assert figures["tokenmeter_flusher_db_unavailable_total"] > 0  # it did meet the outage
            n, distinct = await _count(db)
            async with db.sessions() as s:
                ids = set((await s.execute(select(TokenTransaction.transaction_id))).scalars())
            assert n == distinct == expected  # no duplicate rows, nothing missing
            assert ids == set(allowed) | {f"{a}:1" for a in accounts}  # exactly the acknowledged changes
            checks = await reconcile(redis, db, shards=meter.shards, prefix=meter.prefix)
            assert len(checks) == ACCOUNTS and all(c.ok and c.unflushed == 0 for c in checks)
            with capsys.disabled():
                print(f"\n[pg stop -m immediate {outage_s:.0f}s + {REFUSING_S:.0f}s not accepting] "
                      f"debits admitted {len(allowed)}, rows {n}, "
                      f"duplicate rows {n - distinct}, redelivered entries skipped "
                      f"{figures['tokenmeter_flusher_duplicates_total']:.0f}, batch retries "
                      f"{figures['tokenmeter_flusher_db_unavailable_total']:.0f}, caught up {caught_up:.1f}s "
                      f"after the restart, reconcile clean")
        finally:
            stop_load.set()
            for t in load:
                t.cancel()
            await asyncio.gather(*load, return_exceptions=True)
            stop_process(proc)
            await db.close()


async def test_flusher_ends_with_a_clear_message_on_a_configuration_error(tmp_path: Any) -> None:
    """A database that does not exist is not waited for: exit 2 and say what to check."""
    async with private_postgres() as pg:
        env = {**os.environ, "REDIS_URL": REDIS_URL, "DATABASE_URL": pg.url("no_such_database"),
               "TOKENMETER_KEY_PREFIX": "tmcfgerr"}
        proc = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "api.cli", "flusher"], env=env,
            capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "check DATABASE_URL" in proc.stderr and "no_such_database" in proc.stderr
