"""Rehydration after lost Redis keys, reconcile's drift report, and the migrations."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from meter import UnknownHold
from meter import keys as keyspace
from persistence import migrate
from persistence.db import Database
from persistence.models import Base
from persistence.reconcile import format_report, reconcile
from persistence.rehydrate import SnapshotLoader, rehydrate_all
from tests.conftest import MeterFactory, journal_of
from tests.persistence.test_flusher import make_flusher

HEAD = "0007"

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.usefixtures("real_redis")]


async def drop_account_keys(meter: Any, account_id: str) -> None:
    k = keyspace.account_keys(account_id, shards=meter.shards, prefix=meter.prefix)
    await meter.store.redis.delete(k.account, k.holds, k.hold_expiry)


@pytest.mark.parametrize("unflushed", [0, 3], ids=["all-flushed", "3-unflushed"])
async def test_lost_account_keys_rehydrate_on_next_debit(make_meter: MeterFactory, database: Any,
                                                         unflushed: int) -> None:
    meter = await make_meter("redis")
    meter.loader = SnapshotLoader(database, meter.store.redis, meter.catalog,  # type: ignore[attr-defined]
                                  shards=meter.shards, prefix=meter.prefix)
    await meter.open_account("u1")
    await meter.credit("u1", 2_000, bucket="premium", kind="purchase")
    for _ in range(5):
        await meter.debit("u1", 1_000)
    await make_flusher(meter, database).drain()
    for _ in range(unflushed):  # still only in the stream when the keys vanish
        await meter.debit("u1", 100)
    before = await meter.balance("u1")
    await drop_account_keys(meter, "u1")
    d = await meter.debit("u1", 500)
    assert d.allowed and d.remaining == before.remaining_tokens - 500
    assert d.transaction_id == f"u1:{8 + unflushed}"  # the sequence continues: no id reused
    after = await meter.balance("u1")
    assert (after.premium_tokens, after.used_tokens) == (before.premium_tokens, before.used_tokens + 500)
    await make_flusher(meter, database).drain()
    checks = await reconcile(meter.store.redis, database, shards=meter.shards, prefix=meter.prefix)  # type: ignore[attr-defined]
    assert [c.status for c in checks] == ["ok"]


@pytest.mark.parametrize("where", ["ledger", "stream", "both"])
async def test_open_holds_survive_rehydration(make_meter: MeterFactory, database: Any, where: str) -> None:
    """Holds still open when the keys vanish come back (from the ledger, the stream, or both):
    the balance is the same, and they settle and expire as before. Closed holds stay closed."""
    meter = await make_meter("redis")
    meter.loader = SnapshotLoader(database, meter.store.redis, meter.catalog,  # type: ignore[attr-defined]
                                  shards=meter.shards, prefix=meter.prefix)
    await meter.open_account("u1")
    await meter.credit("u1", 2_000, bucket="premium", kind="purchase")
    settled = await meter.reserve("u1", 500)
    assert settled.hold_id
    await meter.settle("u1", settled.hold_id, 200)
    first = await meter.reserve("u1", 3_000, ttl_ms=60_000)
    if where != "stream":
        await make_flusher(meter, database).drain()
    second = await meter.reserve("u1", 8_000, ttl_ms=1)  # into premium; it will have expired
    if where == "ledger":
        await make_flusher(meter, database).drain()
    assert first.hold_id and second.hold_id
    before = await meter.balance("u1")
    assert before.reserved_tokens == 11_000
    await drop_account_keys(meter, "u1")
    assert await meter.rehydrate("u1")  # what the next call does (rehydrate_all knows flushed accounts)
    meter.clock.advance(10)  # type: ignore[attr-defined]  # (a FakeClock) past the second hold's expiry
    bal = await meter.balance("u1")  # the expired hold was released by this touch
    assert (bal.remaining_tokens, bal.reserved_tokens) == (before.remaining_tokens + 8_000, 3_000)
    r = await meter.settle("u1", first.hold_id, 2_500)
    assert (r.charged, r.remaining) == (2_500, before.remaining_tokens + 8_000 + 500)
    with pytest.raises(UnknownHold):
        await meter.settle("u1", settled.hold_id, 1)
    await make_flusher(meter, database).drain()
    checks = await reconcile(meter.store.redis, database, shards=meter.shards, prefix=meter.prefix)  # type: ignore[attr-defined]
    assert [c.status for c in checks] == ["ok"]


async def test_unknown_holds_come_back_as_bonus_after_rehydration(make_meter: MeterFactory,
                                                                   database: Any) -> None:
    """When the open holds cannot be told (here: the hold's expiry is lost), the held
    tokens are returned to the bonus bucket and journaled, so the ledger still balances."""
    meter = await make_meter("redis")
    meter.loader = SnapshotLoader(database, meter.store.redis, meter.catalog,  # type: ignore[attr-defined]
                                  shards=meter.shards, prefix=meter.prefix)
    await meter.open_account("u1")
    hold = await meter.reserve("u1", 3_000)
    assert hold.hold_id
    await make_flusher(meter, database).drain()
    async with database.engine.begin() as conn:
        await conn.execute(text("UPDATE token_transactions SET description = 'garbled', hold_expires_ms = NULL "
                                "WHERE account_id = 'u1' AND transaction_type = 'hold'"))
    await drop_account_keys(meter, "u1")  # and the stream with it, as when Redis loses its data
    await meter.store.redis.delete(keyspace.journal_key(keyspace.shard_of("u1", meter.shards), meter.prefix))  # type: ignore[attr-defined]
    assert await rehydrate_all(meter, database) == 1
    bal = await meter.balance("u1")
    assert (bal.remaining_tokens, bal.reserved_tokens, bal.bonus_tokens) == (10_000, 0, 3_000)
    assert (await journal_of(meter, "u1"))[-1].note.startswith("hold lost")
    assert await rehydrate_all(meter, database) == 0  # present now: nothing to do


async def test_a_hold_written_before_hx_rehydrates_from_its_note(make_meter: MeterFactory,
                                                                   database: Any) -> None:
    """Ledger rows written before the 'hx' field (hold_expires_ms NULL, the expiry only in the
    note 'expires N') still give back their open hold, with its expiry."""
    meter = await make_meter("redis")
    meter.loader = SnapshotLoader(database, meter.store.redis, meter.catalog,  # type: ignore[attr-defined]
                                  shards=meter.shards, prefix=meter.prefix)
    await meter.open_account("u1")
    hold = await meter.reserve("u1", 3_000, ttl_ms=60_000)
    assert hold.hold_id and hold.expires_at_ms
    await make_flusher(meter, database).drain()
    async with database.engine.begin() as conn:
        stored = (await conn.execute(text("SELECT hold_expires_ms, description FROM token_transactions "
                                          "WHERE account_id = 'u1' AND transaction_type = 'hold'"))).one()
        assert tuple(stored) == (hold.expires_at_ms, None)  # the new form: its own column, no note
        await conn.execute(text(f"UPDATE token_transactions SET hold_expires_ms = NULL, "
                                f"description = 'expires {hold.expires_at_ms}' "
                                "WHERE account_id = 'u1' AND transaction_type = 'hold'"))
    await drop_account_keys(meter, "u1")
    await meter.store.redis.delete(keyspace.journal_key(keyspace.shard_of("u1", meter.shards), meter.prefix))  # type: ignore[attr-defined]
    assert await rehydrate_all(meter, database) == 1
    bal = await meter.balance("u1")
    assert (bal.remaining_tokens, bal.reserved_tokens) == (7_000, 3_000)
    meter.clock.advance(60_000)  # type: ignore[attr-defined]  # (a FakeClock) to the restored expiry
    bal = await meter.balance("u1")
    assert (bal.remaining_tokens, bal.reserved_tokens) == (10_000, 0)


async def test_reconcile_reports_drift_and_missing_accounts(make_meter: MeterFactory, database: Any) -> None:
    meter = await make_meter("redis")
    redis = meter.store.redis  # type: ignore[attr-defined]
    for a in ("a1", "a2", "a3"):
        await meter.open_account(a)
        await meter.debit(a, 10)
    await make_flusher(meter, database).drain()
    await meter.debit("a1", 5)  # unflushed: still counted from the stream
    await redis.hincrby(keyspace.account_keys("a2", prefix=meter.prefix).account, "p", 7)  # drift
    await drop_account_keys(meter, "a3")
    checks = {c.account_id: c for c in await reconcile(redis, database, prefix=meter.prefix)}
    assert checks["a1"].ok and checks["a1"].unflushed == 1
    assert (checks["a2"].status, checks["a2"].drift) == ("drift", 7)
    assert checks["a3"].status.startswith("missing")
    report = format_report(list(checks.values()))
    assert "a2" in report and "a1 " not in report and "3 accounts checked, 2 with drift" in report


async def test_reconcile_command_exits_nonzero_on_drift(make_meter: MeterFactory, pg_database: str) -> None:
    meter = await make_meter("redis")
    db = Database(pg_database)
    try:
        async with db.engine.begin() as conn:
            await conn.execute(text("TRUNCATE token_transactions, token_balances"))
        await meter.open_account("cli-1")
        await make_flusher(meter, db).drain()
        env = {**os.environ, "DATABASE_URL": pg_database, "REDIS_URL": "redis://127.0.0.1:6379/0",
               "TOKENMETER_KEY_PREFIX": meter.prefix}
        cmd = [sys.executable, "-m", "api.cli", "reconcile"]
        ok = await asyncio.to_thread(subprocess.run, cmd, env=env, capture_output=True, text=True, timeout=120)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        await meter.store.redis.hincrby(keyspace.account_keys("cli-1", prefix=meter.prefix).account, "b", 1)  # type: ignore[attr-defined]
        bad = await asyncio.to_thread(subprocess.run, cmd, env=env, capture_output=True, text=True, timeout=120)
        assert bad.returncode == 1 and "cli-1" in bad.stdout and "drift" in bad.stdout
    finally:
        await db.close()


async def test_migrations_up_down_up_and_match_the_models(database: Any) -> None:
    def diff(connection: Any) -> list[Any]:
        return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))

    def tables(connection: Any) -> set[str]:
        return set(inspect(connection).get_table_names())

    async with database.engine.connect() as conn:
        assert await conn.run_sync(diff) == []
    await migrate.downgrade(database)
    async with database.engine.connect() as conn:
        assert await conn.run_sync(tables) <= {"alembic_version"}
    await migrate.upgrade(database)
    async with database.engine.connect() as conn:
        present = await conn.run_sync(tables)
    assert {"accounts", "token_transactions", "token_balances", "promo_codes"} <= present
    assert await migrate.current_revision(database) == HEAD


async def test_the_transactions_key_migration_keeps_every_row(database: Any) -> None:
    """0004 re-keys token_transactions by (account_id, seq): rows survive up and down, and
    afterwards a duplicate (account, seq) is refused by the key."""
    cols = ("transaction_id, account_id, seq, stream_id, transaction_type, tokens_before, tokens_changed, "
            "tokens_after, held_changed, held_after, rollover_delta, monthly_delta, bonus_delta, premium_delta, "
            "agent_type, estimated_cost_usd_micros, estimated_cost_inr_paise, created_at")
    rows = [{"t": f"m{i % 3}:{i}", "a": f"m{i % 3}", "s": i, "x": f"{i}-0", "ag": "code" if i % 2 else None,
             "at": datetime(2026, 11, 1, tzinfo=UTC) + timedelta(seconds=i)} for i in range(1, 31)]
    insert = text(f"INSERT INTO token_transactions ({cols}) VALUES (:t, :a, :s, :x, 'usage', 100, -1, 99, 0, 0, "
                  "0, -1, 0, 0, :ag, 3, 25, :at)")

    async def stored() -> list[tuple[Any, ...]]:
        async with database.engine.connect() as conn:
            return [tuple(r) for r in (await conn.execute(text(
                "SELECT transaction_id, account_id, seq, stream_id, agent_type FROM token_transactions "
                "ORDER BY account_id, seq"))).all()]

    await migrate.downgrade(database, "0003")
    async with database.engine.begin() as conn:
        await conn.execute(insert, rows)
    before = await stored()
    assert len(before) == 30
    await migrate.upgrade(database)
    assert await stored() == before
    with pytest.raises(IntegrityError):  # the same key again
        async with database.engine.begin() as conn:
            await conn.execute(insert, [{**rows[0], "x": "99-0"}])
    with pytest.raises(IntegrityError):  # a transaction id that is not the key
        async with database.engine.begin() as conn:
            await conn.execute(insert, [{**rows[0], "t": rows[1]["t"], "s": 99, "x": "99-0"}])
    await migrate.downgrade(database, "0003")
    assert await stored() == before
    await migrate.upgrade(database)
    assert await stored() == before
