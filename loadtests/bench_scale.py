"""`tokenmeter bench` section `scale`: `meter.debit` spread over 1, 1,000 and 1,000,000 accounts
(100,000 with --quick) and with a few hot accounts, and what an account costs Redis in memory.

Accounts are opened through the meter itself (`open_account`, thousands in flight: the store
sends each event-loop tick's calls in one write, so the opens go out pipelined). Memory: INFO
used_memory before and after opening them, split into the journal streams' share (MEMORY USAGE
of each shard's stream: one entry per open until a flusher trims it) and the rest (the keyspace:
the account's hash and its dictionary entry); plus MEMORY USAGE of a sample of account hashes.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from redis import Redis

from loadtests.bench_core import Run, meter_rate, spread
from meter import Meter
from meter import keys as keyspace

HOT_ACCOUNTS = 10
HOT_SHARE = 0.9  # of the calls on the hot accounts; the rest spread over every account


def account_id(i: int) -> str:
    return f"bench-{i}"


async def open_accounts(meter: Meter, start: int, stop: int, in_flight: int = 2_000) -> float:
    """Open accounts start..stop-1; accounts opened per second."""
    t0 = time.perf_counter()
    for lo in range(start, stop, in_flight):
        ids = [account_id(i) for i in range(lo, min(lo + in_flight, stop))]
        await asyncio.gather(*(meter.open_account(a, plan="bench") for a in ids))
    return (stop - start) / max(time.perf_counter() - t0, 1e-9)


def journal_bytes(redis: Redis, meter: Meter) -> tuple[int, int]:
    """(bytes, entries) of every shard's journal stream."""
    size = entries = 0
    for shard in range(meter.shards):
        key = keyspace.journal_key(shard, meter.prefix)
        size += int(redis.memory_usage(key, samples=0) or 0)
        entries += int(redis.xlen(key))
    return size, entries


def memory_over(redis: Redis, meter: Meter, before: tuple[int, int, int], opened: int) -> dict[str, float]:
    used0, j0, n0 = before
    used1 = int(redis.info("memory")["used_memory"])
    j1, n1 = journal_bytes(redis, meter)
    sample = random.Random(7).sample(range(opened), min(500, opened))
    hashes = [int(redis.memory_usage(keyspace.account_keys(account_id(i), shards=meter.shards,
                                                           prefix=meter.prefix).account, samples=0) or 0)
              for i in sample]
    return {"used_memory_per_account": (used1 - used0) / max(opened, 1),
            "keyspace_per_account": ((used1 - used0) - (j1 - j0)) / max(opened, 1),
            "journal_bytes_per_entry": (j1 - j0) / max(n1 - n0, 1),
            "account_hash_bytes": sum(hashes) / max(len(hashes), 1)}


async def section_scale(run: Run) -> dict[str, Any]:
    big = 100_000 if run.quick else 1_000_000
    meter = await run.meter(prefix=f"{run.prefix}s")
    redis = run.redis()
    out: dict[str, Any] = {"accounts_max": big, "quick_note": "--quick: 100,000 accounts instead of 1,000,000"
                           if run.quick else ""}
    try:
        opened = 0
        for size in (1, 1_000, big):
            if size == big:  # what the accounts between 1,000 and `big` cost Redis
                used = int(redis.info("memory")["used_memory"])
                before = (used, *journal_bytes(redis, meter))
            rate = await open_accounts(meter, opened, size)
            if size == big:
                mem = memory_over(redis, meter, before, size - opened)
                mem.update({"accounts_opened": size - opened, "open_per_s": rate})
                out["memory"] = mem
                print(f"  opened {size - opened:,} accounts at {rate:,.0f}/s: "
                      f"{mem['used_memory_per_account']:,.0f} bytes each (used_memory), "
                      f"{mem['keyspace_per_account']:,.0f} without the journal's entries")
            opened = size
            ids = [account_id(i) for i in range(size)]
            if size > 1:
                await meter_rate(run, meter, spread(ids), min(1.0, run.seconds))  # warm-up, not reported
            res = await meter_rate(run, meter, spread(ids))
            out[f"accounts_{size}"] = res
            print(f"  meter.debit over {size:>9,} accounts {res['rps']:>10,.0f}/s   "
                  f"{res['usec_per_call']:6.2f} µs/call in Redis")
        ids = [account_id(i) for i in range(big)]
        j0 = journal_bytes(redis, meter)
        res = await meter_rate(run, meter, spread(ids, ids[:HOT_ACCOUNTS], HOT_SHARE))
        j1 = journal_bytes(redis, meter)
        out["memory"]["journal_bytes_per_debit"] = (j1[0] - j0[0]) / max(j1[1] - j0[1], 1)
        res.update({"hot_accounts": HOT_ACCOUNTS, "hot_share": HOT_SHARE})
        out["hot"] = res
        print(f"  meter.debit, {HOT_SHARE:.0%} on {HOT_ACCOUNTS} hot accounts {res['rps']:>10,.0f}/s   "
              f"{res['usec_per_call']:6.2f} µs/call in Redis")
    finally:
        redis.close()
        await meter.close()
    return out
