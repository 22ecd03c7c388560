"""Flusher throughput next to raw COPY, and lag under load, in one run.

    python3 dev.py shell python -m loadtests.bench_flusher [--entries 200000] [--pg postgresql://postgres@127.0.0.1:5432/test]

1. Makes a backlog of `--entries` journal entries with real debits (also measuring the
   meter's decisions/s at the same time).
2. Drains it with the flusher into a scratch Postgres database: rows/s.
3. Truncates, then `copy_records_to_table` of the very same rows into the same table: rows/s.
4. Runs debits at 50% of the measured peak for `--load-seconds` with a flusher process
   running, sampling the flusher lag (oldest unflushed entry age, pending entries).
Prints the figures and ratios. Numbers, never assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid

import asyncpg
from redis.asyncio import Redis

from loadtests.bench_debit import BENCH_CATALOG
from meter import Meter
from meter import keys as keyspace
from meter._catalog import parse_catalog
from persistence import migrate
from persistence.db import Database
from persistence.flusher import Flusher, FlusherConfig, tune_gc
from persistence.ledger import TX_COLUMNS, LedgerWriter, prepare


async def make_backlog(meter: Meter, accounts: list[str], entries: int, concurrency: int = 256) -> float:
    todo = list(range(entries))

    async def caller() -> None:
        while todo:
            k = todo.pop()
            await meter.debit(accounts[k % len(accounts)], 1 + k % 9, agent="idea", model="haiku")

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return entries / (time.perf_counter() - start)


async def paced_debits(meter: Meter, accounts: list[str], rate: float, seconds: float) -> int:
    """Debits at a steady `rate` per second for `seconds` (ticks of 10 ms)."""
    sent, start, tick = 0, time.perf_counter(), 0.01
    pending: set[asyncio.Task[object]] = set()
    while (elapsed := time.perf_counter() - start) < seconds:
        due = int(rate * elapsed) - sent
        for _ in range(due):
            t = asyncio.ensure_future(meter.debit(accounts[sent % len(accounts)], 1, agent="idea"))
            pending.add(t)
            t.add_done_callback(pending.discard)
            sent += 1
        await asyncio.sleep(tick)
    await asyncio.gather(*pending)
    return sent


async def _wait_rows(pg_url: str, n: int) -> tuple[int, float]:
    """Wait until the table holds at least n rows; (rows seen, when)."""
    conn = await asyncpg.connect(pg_url)
    try:
        while (count := await conn.fetchval("SELECT count(*) FROM token_transactions")) < n:
            await asyncio.sleep(0.02)
        return int(count), time.perf_counter()
    finally:
        await conn.close()


async def main_async(args: argparse.Namespace) -> dict[str, float]:
    """The run; prints it and returns its figures (for `tokenmeter bench`)."""
    catalog = parse_catalog(BENCH_CATALOG)
    prefix = f"tmbench{uuid.uuid4().hex[:8]}"
    dbname = f"tm_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(args.pg)
    await admin.execute(f'CREATE DATABASE "{dbname}"')
    pg_url = args.pg.rsplit("/", 1)[0] + f"/{dbname}"
    db = Database(pg_url)
    await migrate.upgrade(db)
    meter = await Meter.connect(args.redis_url, prefix=prefix, catalog=catalog)
    redis: Redis = meter.store.redis  # type: ignore[attr-defined]
    accounts = [f"bench-{i}" for i in range(args.accounts)]
    proc = None
    result: dict[str, float] = {"entries": args.entries, "batch": args.batch}
    try:
        for a in accounts:
            await meter.open_account(a, plan="bench")
            await meter.credit(a, 2**40, bucket="premium")
        flusher = Flusher(redis, LedgerWriter(db, catalog), prefix=prefix,
                          config=FlusherConfig(batch=args.batch, block_ms=10))
        await flusher.setup()
        peak = await make_backlog(meter, accounts, args.entries)
        print(f"meter.debit making the backlog (256 callers)   : {peak:10,.0f} decisions/s")
        result["backlog_decisions_per_s"] = peak

        # the same rows for raw COPY, read before the flusher trims the streams
        rows = []
        for shard in range(meter.shards):
            for eid, fields in await redis.xrange(keyspace.journal_key(shard, prefix)):
                rows.append(prepare(fields, eid, catalog)[0])

        if args.flushers > 1:  # several flusher processes share the consumer group
            env = {**os.environ, "REDIS_URL": args.redis_url, "DATABASE_URL": pg_url,
                   "TOKENMETER_KEY_PREFIX": prefix, "TOKENMETER_FLUSHER_BATCH": str(args.batch),
                   "TOKENMETER_FLUSHER_BLOCK_MS": "10"}
            procs = [subprocess.Popen([sys.executable, "-m", "api.cli", "flusher", "--consumer", f"bench-{i}"],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                     for i in range(args.flushers)]  # one name each: names are stable, not random
            first, start = await _wait_rows(pg_url, 1)  # time from the first committed batch on
            await _wait_rows(pg_url, len(rows))
            flush_rate = (len(rows) - first) / (time.perf_counter() - start)
            for p in procs:
                p.send_signal(signal.SIGTERM)
                p.wait()
            flushed = len(rows)
            label = f"{args.flushers} flusher processes draining {flushed:,} entries"
        else:
            tune_gc()  # as `tokenmeter flusher` does
            start = time.perf_counter()
            flushed = await flusher.drain()
            flush_rate = flushed / (time.perf_counter() - start)
            label = f"flusher draining {flushed:,} entries into Postgres"
        print(f"{label:47s}: {flush_rate:10,.0f} rows/s")
        result.update({"flusher_rows_per_s": flush_rate, "rows": flushed, "flushers": args.flushers})

        raw = await asyncpg.connect(pg_url)
        await raw.execute("TRUNCATE token_transactions")
        start = time.perf_counter()
        for i in range(0, len(rows), args.batch):
            async with raw.transaction():
                await raw.copy_records_to_table("token_transactions", records=rows[i:i + args.batch],
                                                columns=list(TX_COLUMNS))
        copy_rate = len(rows) / (time.perf_counter() - start)
        await raw.close()
        print(f"raw copy_records_to_table, same rows, same batch: {copy_rate:10,.0f} rows/s")
        result["copy_rows_per_s"] = copy_rate
        print(f"ratios: flusher / raw COPY = {flush_rate / copy_rate:.2f}; "
              f"flusher / meter decisions = {flush_rate / peak:.2f}")

        # lag at 50% of peak debit load, flusher in its own process (as deployed)
        env = {**os.environ, "REDIS_URL": args.redis_url, "DATABASE_URL": pg_url,
               "TOKENMETER_KEY_PREFIX": prefix, "TOKENMETER_FLUSHER_BATCH": str(args.batch)}
        proc = subprocess.Popen([sys.executable, "-m", "api.cli", "flusher"], env=env,
                                stdout=subprocess.DEVNULL)
        await asyncio.sleep(1.0)
        samples: list[dict[str, float]] = []
        sampling = asyncio.Event()

        async def sample() -> None:
            # stopped by an event, not cancel(): a cancel landing inside redis-py's pool
            # checkout can be swallowed, and the sampler would run on forever
            while not sampling.is_set():
                samples.append(await flusher.lag())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(sampling.wait(), 0.5)

        sampler = asyncio.ensure_future(sample())
        sent = await paced_debits(meter, accounts, peak * 0.5, args.load_seconds)
        sampling.set()
        await sampler
        worst = max((s["oldest_unflushed_seconds"] for s in samples), default=0.0)
        worst_pending = max((s["pending"] for s in samples), default=0)
        print(f"at 50% of peak ({peak * 0.5:,.0f}/s, {sent:,} debits over {args.load_seconds:.0f}s): "
              f"flusher lag max {worst * 1000:.0f} ms, max pending {worst_pending:,.0f} entries")
        result.update({"lag_load_per_s": peak * 0.5, "lag_max_ms": worst * 1000, "lag_max_pending": worst_pending})
        return result
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
        keys = [k async for k in redis.scan_iter(match=f"{prefix}:*", count=1000)]
        for i in range(0, len(keys), 500):
            await redis.delete(*keys[i:i + 500])
        await meter.close()
        await db.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        await admin.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    p.add_argument("--entries", type=int, default=200_000)
    p.add_argument("--accounts", type=int, default=1_000)
    p.add_argument("--batch", type=int, default=FlusherConfig().batch)
    p.add_argument("--load-seconds", type=float, default=10.0)
    p.add_argument("--flushers", type=int, default=1, help="drain with N flusher processes (default: one, in-process)")
    args = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
