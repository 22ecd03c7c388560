"""The flusher moves every journal entry into the database exactly once, whatever happens."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from sqlalchemy import func, select, text

from meter import Meter
from meter import keys as keyspace
from persistence.flusher import Flusher, FlusherConfig
from persistence.ledger import LedgerWriter
from persistence.models import TokenBalance, TokenTransaction
from persistence.reconcile import reconcile
from persistence.streams import parse_entries as _entries
from tests.conftest import LUA_BACKENDS, MeterFactory, journal_of

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.usefixtures("real_redis")]


def make_flusher(meter: Meter, db: Any, **config: Any) -> Flusher:
    return Flusher(meter.store.redis, LedgerWriter(db, meter.catalog), shards=meter.shards,  # type: ignore[attr-defined]
                   prefix=meter.prefix, config=FlusherConfig(block_ms=10, **config))


async def traffic(meter: Meter, accounts: int = 5) -> None:
    for i in range(accounts):
        await meter.open_account(f"acct-{i}")
        await meter.credit(f"acct-{i}", 1_000, bucket="premium", kind="purchase", reference="order-1")
    await asyncio.gather(*(meter.debit(f"acct-{k % accounts}", 10 + k % 7, agent="code", model="sonnet",
                                       input_tokens=3, output_tokens=7 + k % 7)
                           for k in range(min(300, 90 * accounts))))
    h = await meter.reserve("acct-0", 500, agent="report", model="haiku")
    assert h.hold_id
    await meter.settle("acct-0", h.hold_id, 321, model="haiku")


async def rows(db: Any) -> list[Any]:
    async with db.sessions() as s:
        q = select(TokenTransaction).order_by(TokenTransaction.account_id, TokenTransaction.seq)
        return list((await s.execute(q)).scalars())


@pytest.mark.parametrize("backend", LUA_BACKENDS)
async def test_every_entry_once_with_costs_and_snapshots(make_meter: MeterFactory, database: Any, backend: str) -> None:
    meter = await make_meter(backend)
    await traffic(meter)
    journal = [e for i in range(5) for e in await journal_of(meter, f"acct-{i}")]
    flusher = make_flusher(meter, database)
    n = await flusher.drain()
    assert n == len(journal) == flusher.stats.flushed
    assert await flusher.drain() == 0
    stored = await rows(database)
    assert sorted(r.transaction_id for r in stored) == sorted(e.transaction_id for e in journal)
    usage = next(r for r in stored if r.transaction_type == "usage")
    assert usage.agent_type == "code" and usage.model_used == "sonnet"
    # sonnet: $3 per 1M input, $15 per 1M output; micro-dollars, rounded half up
    assert usage.estimated_cost_usd_micros == (usage.input_tokens * 3_000_000
                                               + usage.output_tokens * 15_000_000 + 500_000) // 1_000_000
    assert usage.tokens_after == usage.tokens_before + usage.tokens_changed
    settle = next(r for r in stored if r.transaction_type == "settle")
    assert settle.estimated_cost_usd_micros == (321 * 1_250_000 + 500_000) // 1_000_000  # priced as output
    welcome = next(r for r in stored if r.transaction_type == "allowance")
    assert welcome.description.startswith("welcome") and welcome.tokens_changed == 10_000
    async with database.sessions() as s:
        for i in range(5):
            snap = await s.get(TokenBalance, f"acct-{i}")
            bal = await meter.balance(f"acct-{i}")
            assert (snap.remaining_tokens, snap.reserved_tokens, snap.used_tokens, snap.premium_tokens) == (
                bal.remaining_tokens, bal.reserved_tokens, bal.used_tokens, bal.premium_tokens)
    checks = await reconcile(meter.store.redis, database, shards=meter.shards, prefix=meter.prefix)  # type: ignore[attr-defined]
    assert len(checks) == 5 and all(c.ok for c in checks), checks
    lag = await flusher.lag()
    assert lag["pending"] == 0


async def test_entries_of_a_dead_consumer_are_claimed(make_meter: MeterFactory, database: Any) -> None:
    meter = await make_meter("redis")
    await traffic(meter, accounts=2)
    dead = make_flusher(meter, database, consumer="dead-one")
    await dead.setup()
    taken = await dead._read(">")  # delivered to a consumer that then "dies" before writing
    assert taken
    alive = make_flusher(meter, database, consumer="alive", claim_idle_ms=1, claim_every_s=0)
    await asyncio.sleep(0.01)
    await alive.drain()
    assert alive.stats.flushed == len(taken)
    pend = [await meter.store.redis.xpending(s, "tm-flusher") for s in alive.streams]  # type: ignore[attr-defined]
    assert sum(p["pending"] for p in pend) == 0
    # the dead consumer comes back and writes what it had: duplicates, nothing new
    await dead._process(taken)
    assert dead.stats.flushed == 0 and dead.stats.duplicates == len(taken)
    async with database.sessions() as s:
        count = (await s.execute(select(func.count()).select_from(TokenTransaction))).scalar_one()
    assert count == len(taken)


async def test_malformed_and_poison_entries_go_to_dead_letter(make_meter: MeterFactory,
                                                              database: Any) -> None:
    meter = await make_meter("redis")
    redis = meter.store.redis  # type: ignore[attr-defined]
    await meter.open_account("u1")
    stream = keyspace.journal_key(keyspace.shard_of("u1", meter.shards), meter.prefix)
    flusher = make_flusher(meter, database, consumer="f1", claim_idle_ms=1, claim_every_s=0,
                           max_deliveries=2)
    await flusher.setup()
    bad_id = await redis.xadd(stream, {"t": "usage", "a": "u1"})  # no seq, no deltas
    await flusher.drain()
    dead = await redis.xrange(keyspace.dead_letter_key(meter.prefix))
    assert [(d["id"], d["reason"].split(":")[0]) for _, d in dead] == [(bad_id, "malformed entry")]
    assert json.loads(dead[0][1]["fields"]) == {"t": "usage", "a": "u1"}
    assert flusher.stats.flushed == 1  # the welcome entry
    # an entry that keeps getting delivered without being acked is poison after max_deliveries
    await meter.debit("u1", 5)
    taken = await make_flusher(meter, database, consumer="c1")._read(">")  # delivery 1, then c1 dies
    for name in ("c2", "c3"):  # taken over twice more by consumers that die too
        await redis.xclaim(stream, "tm-flusher", name, min_idle_time=0, message_ids=[taken[0][1]])
    await asyncio.sleep(0.005)
    await flusher.drain()
    assert (await redis.xpending(stream, "tm-flusher"))["pending"] == 0
    dead = await redis.xrange(keyspace.dead_letter_key(meter.prefix))
    assert [d["reason"] for _, d in dead] == [dead[0][1]["reason"], "delivered more than 2 times"]
    assert json.loads(dead[1][1]["fields"])["t"] == "usage"
    assert flusher.stats.dead_letters == 2


async def test_trim_keeps_unacknowledged_entries(make_meter: MeterFactory, database: Any) -> None:
    meter = await make_meter("redis")
    redis = meter.store.redis  # type: ignore[attr-defined]
    await traffic(meter, accounts=1)
    stream = keyspace.journal_key(keyspace.shard_of("acct-0", meter.shards), meter.prefix)
    flusher = make_flusher(meter, database)
    await flusher.drain()
    await flusher.trim()
    assert await redis.xlen(stream) <= 1
    await meter.debit("acct-0", 5)
    await meter.debit("acct-0", 6)
    reader = make_flusher(meter, database, consumer="slow")
    held = await reader._read(">")  # delivered, not acked
    assert len(held) == 2
    await flusher.trim()
    assert {eid for _, eid, _ in held} <= {eid for eid, _ in await redis.xrange(stream)}


class Gate:
    """A TCP proxy on loopback in front of Postgres that can refuse connections (an outage)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.open = True
        self.conns: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.close()
            return
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.conns += [writer, up_w]

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    def cut(self) -> None:
        self.open = False
        for w in self.conns:
            w.close()
        self.conns.clear()

    async def stop(self) -> None:
        self.cut()
        self.server.close()


async def test_database_outage_hot_path_keeps_working_nothing_lost(make_meter: MeterFactory,
                                                                  pg_database: str) -> None:
    from persistence.db import Database

    gate = Gate(5432)
    port = await gate.start()
    db = Database(pg_database.replace("127.0.0.1:5432", f"127.0.0.1:{port}"), pool_size=2)
    direct = Database(pg_database)
    try:
        async with direct.engine.begin() as conn:
            await conn.execute(text("TRUNCATE token_transactions, token_balances"))
        meter = await make_meter("redis")
        flusher = make_flusher(meter, db, backoff_max_s=0.1)
        stop = asyncio.Event()
        for i in range(3):
            await meter.open_account(f"o{i}")
        task = asyncio.create_task(flusher.run(stop))
        await asyncio.sleep(0.3)
        gate.cut()  # Postgres "goes away"
        decisions = [await meter.debit(f"o{k % 3}", 7) for k in range(150)]
        assert all(d.allowed for d in decisions)  # the hot path never touches the database
        await asyncio.sleep(0.5)
        assert flusher.stats.db_retries > 0
        gate.open = True  # back
        for _ in range(100):
            if (await flusher.lag())["pending"] == 0 and flusher.stats.flushed >= 153:
                break
            await asyncio.sleep(0.1)
        stop.set()
        await task
        async with direct.sessions() as s:
            count = (await s.execute(select(func.count()).select_from(TokenTransaction))).scalar_one()
        assert count == 153
        checks = await reconcile(meter.store.redis, direct, shards=meter.shards, prefix=meter.prefix)  # type: ignore[attr-defined]
        assert all(c.ok for c in checks)
    finally:
        await gate.stop()
        await db.close()
        await direct.close()


def test_raw_stream_replies_of_both_protocols() -> None:
    """XREADGROUP replies are parsed from Redis's own shapes: a RESP3 map or a RESP2 list; an
    entry deleted while pending ([id, nil]) is skipped."""
    entries = [["1-0", ["t", "usage", "a", "x"]], ["2-0", None], ["3-0", ["t", "grant"]]]
    want = [("s", "1-0", {"t": "usage", "a": "x"}), ("s", "3-0", {"t": "grant"})]
    assert _entries({"s": entries}) == want
    assert _entries([["s", entries]]) == want
    assert _entries(None) == [] and _entries({}) == []


async def test_redis_restart_flusher_waits_and_resumes(database: Any, tmp_path: Any) -> None:
    """Redis (with an AOF) stops mid-run and comes back: the flusher waits, reconnects and
    flushes every entry once, including those it had read or written but not acknowledged."""
    import shutil
    import socket
    import subprocess

    from redis import exceptions as redis_errors

    from meter import StoreUnavailable
    from meter._catalog import load_catalog
    from tests.processes import start_process, stop_process

    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed: this test starts its own (apt-get install redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [server, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(tmp_path), "--save", "",
           "--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no"]

    async def start() -> subprocess.Popen[bytes]:
        proc = start_process(cmd)
        for _ in range(100):
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                return proc
            except OSError:
                await asyncio.sleep(0.05)
        stop_process(proc)
        raise AssertionError("redis-server did not start")

    proc = await start()
    meter = await Meter.connect(f"redis://127.0.0.1:{port}/0", catalog=load_catalog(), prefix="tmrestart")
    try:
        async with database.engine.begin() as conn:
            await conn.execute(text("DELETE FROM token_transactions"))
        flusher = make_flusher(meter, database, backoff_max_s=0.1, batch=16)
        stop = asyncio.Event()
        for i in range(5):  # 60 debits each: under the free plan's 100 a day
            await meter.open_account(f"r{i}")
        task = asyncio.create_task(flusher.run(stop))
        before = [await meter.debit(f"r{k % 5}", 5) for k in range(200)]
        proc.terminate()  # a clean stop: the AOF has every write
        proc.wait(10)
        with pytest.raises(StoreUnavailable):  # meanwhile the meter fails closed
            await meter.debit("r0", 5)
        await asyncio.sleep(0.5)  # the flusher meets the outage and keeps retrying
        assert not task.done()
        proc = await start()
        after = [await meter.debit(f"r{k % 5}", 5) for k in range(100)]
        assert all(d.allowed for d in before + after)
        for _ in range(150):
            # rows, not stats.flushed: a batch written but not acknowledged before the outage is
            # written again afterwards and counted as duplicates
            try:
                pending = (await flusher.lag())["pending"]
            except redis_errors.ConnectionError:  # a pooled connection from before the restart
                continue
            if pending == 0 and len(await rows(database)) == 305:
                break
            await asyncio.sleep(0.1)
        stop.set()
        await task
        stored = await rows(database)
        assert len(stored) == 305 and len({(r.account_id, r.seq) for r in stored}) == 305
        checks = await reconcile(meter.store.redis, database, shards=meter.shards, prefix=meter.prefix)  # type: ignore[attr-defined]
        assert len(checks) == 5 and all(c.ok for c in checks), checks
    finally:
        await meter.close()
        stop_process(proc)


@pytest.mark.parametrize("backend", LUA_BACKENDS)
async def test_entries_of_the_earlier_format_still_flush(make_meter: MeterFactory, backend: str) -> None:
    """Entries written before the compact 'n' field (q, ts, bk, d, av, hd; still in a stream
    during an upgrade) parse to the same journal entry and the same row."""
    from meter import JournalEntry
    from persistence.ledger import prepare

    meter = await make_meter(backend)
    await meter.open_account("old-1")
    await meter.debit("old-1", 40, agent="code", model="sonnet", input_tokens=10, output_tokens=30)
    h = await meter.reserve("old-1", 500, model="haiku")
    assert h.hold_id
    await meter.settle("old-1", h.hold_id, 321, model="haiku")
    redis = meter.store.redis  # type: ignore[attr-defined]
    stream = keyspace.journal_key(keyspace.shard_of("old-1", meter.shards), meter.prefix)
    entries = [(eid, f) for eid, f in await redis.xrange(stream) if f["a"] == "old-1"]
    assert len(entries) == 4 and all(set(f) >= {"t", "a", "n", "st"} for _, f in entries)
    for eid, f in entries:
        seq, ts, *deltas = f["n"].split(":")
        _, _, r, m, b, p, h_after = f["st"].split(":")[:7]
        old = {k: v for k, v in f.items() if k != "n"} | {
            "q": seq, "ts": ts, "bk": ":".join(deltas), "d": str(sum(map(int, deltas))),
            "av": str(int(r) + int(m) + int(b) + int(p)), "hd": h_after}
        assert JournalEntry.from_fields(old) == JournalEntry.from_fields(f)
        assert prepare(old, eid, meter.catalog) == prepare(f, eid, meter.catalog)


async def test_entries_written_before_hx_and_the_daily_counters_flush(make_meter: MeterFactory,
                                                                     database: Any) -> None:
    """A 'hold' entry of the previous code (its expiry only in the note 'expires N', and a
    9-field 'st' without day:rq:ut) still in the stream flushes: the row gets the expiry in
    hold_expires_ms, the snapshot zero daily counters; the current form gives the same row."""
    meter = await make_meter("redis")
    await meter.open_account("old-2")
    h = await meter.reserve("old-2", 500, ttl_ms=30_000)
    assert h.hold_id and h.expires_at_ms
    redis = meter.store.redis  # type: ignore[attr-defined]
    stream = keyspace.journal_key(keyspace.shard_of("old-2", meter.shards), meter.prefix)
    flusher = make_flusher(meter, database)
    await flusher.setup()
    (hold_id, new), = [(eid, f) for eid, f in await redis.xrange(stream) if f["t"] == "hold"]
    assert new["hx"] == str(h.expires_at_ms) and "nt" not in new
    old = {k: v for k, v in new.items() if k != "hx"} | {
        "a": "old-3", "nt": f"expires {h.expires_at_ms}", "st": ":".join(new["st"].split(":")[:9])}
    await redis.xadd(stream, old)
    await flusher.drain()
    async with database.engine.connect() as conn:
        got = (await conn.execute(text(
            "SELECT account_id, hold_expires_ms, description, held_after FROM token_transactions "
            "WHERE transaction_type = 'hold' ORDER BY account_id"))).all()
        snaps = (await conn.execute(text(
            "SELECT account_id, day_index, requests_today, reserved_tokens FROM token_balances "
            "ORDER BY account_id"))).all()
    assert [tuple(r) for r in got] == [("old-2", h.expires_at_ms, None, 500),
                                       ("old-3", h.expires_at_ms, f"expires {h.expires_at_ms}", 500)]
    day = meter.clock.now_ms() // 86_400_000
    assert [tuple(r) for r in snaps] == [("old-2", day, 1, 500), ("old-3", 0, 0, 500)]
    assert flusher.stats.dead_letters == 0 and hold_id


async def test_stop_during_a_database_outage_ends_the_loop_with_every_batch_pending(
        make_meter: MeterFactory, database: Any) -> None:
    """Stopping has its own signal (FlusherStopped), and the batches in flight beside the one that
    stopped end with it: none is left running or failing unobserved, none is acknowledged."""
    import gc

    from persistence.flusher import FlusherStopped
    from persistence.ledger import DatabaseUnavailable

    class DownWriter(LedgerWriter):  # a database that stays down
        async def write(self, batch: Any) -> Any:
            raise DatabaseUnavailable("connection refused")

    meter = await make_meter("redis")
    redis = meter.store.redis  # type: ignore[attr-defined]
    accounts = [f"s{i}" for i in range(6)]
    for a in accounts:
        await meter.open_account(a)
    unobserved: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: unobserved.append(context))
    try:
        # batch 1: each entry is its own batch, two in flight at once
        flusher = Flusher(redis, DownWriter(database, meter.catalog), shards=meter.shards, prefix=meter.prefix,
                          config=FlusherConfig(block_ms=10, batch=1, writers=2, backoff_max_s=0.02))
        stop = asyncio.Event()
        task = asyncio.create_task(flusher.run(stop))
        for _ in range(200):
            if flusher.stats.db_retries >= 4:
                break
            await asyncio.sleep(0.01)
        assert flusher.stats.db_retries >= 4
        stop.set()
        await asyncio.wait_for(task, 10)  # returns: stopping is not an error
        with pytest.raises(FlusherStopped):  # what a write raises once stop is set
            await flusher._write([])
        assert not [t for t in asyncio.all_tasks() if "_write_batch" in repr(t.get_coro())]
        gc.collect()
        assert not unobserved, unobserved
    finally:
        loop.set_exception_handler(None)
    streams = {keyspace.journal_key(keyspace.shard_of(a, meter.shards), meter.prefix) for a in accounts}
    pending = [(await redis.xpending(s, "tm-flusher"))["pending"] for s in streams]
    assert sum(pending) == len(accounts) and flusher.stats.flushed == 0
