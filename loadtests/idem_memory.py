"""What idempotency keys cost Redis: N debits with an Idempotency-Key against N without, on
fresh key prefixes of the Redis at --redis, measured with MEMORY USAGE and INFO memory.

    python3 dev.py shell python -m loadtests.idem_memory --calls 20000

Prints the bytes of one stored answer, the extra bytes a keyed call adds in all (the key, plus
the request id and the record carried in its journal entry until flushed), and what that is per
million keys held and for a day at 1,000 keyed calls/s at a few retentions. Cleans up after.
"""

from __future__ import annotations

import argparse
import asyncio
import uuid

from redis.asyncio import Redis

from meter import Meter
from meter import keys as keyspace

MIB = 1024 * 1024
PREFIXES = {False: "tq", True: "tk"}  # scratch prefixes, emptied before and after


async def _used(redis: Redis) -> int:
    info = await redis.info("memory")
    return int(info["used_memory"])


async def _run(meter: Meter, accounts: list[str], calls: int, keyed: bool) -> None:
    sem = asyncio.Semaphore(256)

    async def one(i: int) -> None:
        async with sem:
            rid = str(uuid.uuid4()) if keyed else None  # a gateway's typical key: a UUID
            await meter.debit(accounts[i % len(accounts)], 1, request_id=rid)

    await asyncio.gather(*(one(i) for i in range(calls)))


async def _delete(redis: Redis, prefix: str) -> None:
    keys = [k async for k in redis.scan_iter(match=f"{prefix}:*", count=1000)]
    for i in range(0, len(keys), 500):
        await redis.delete(*keys[i:i + 500])


async def main(url: str, calls: int) -> None:
    results = {}
    for keyed in (False, True):
        prefix = PREFIXES[keyed]  # as long as the default 'tm': the key's length decides its allocation
        meter = await Meter.connect(url, prefix=prefix, timeout_ms=5_000, connect_timeout_ms=2_000)
        redis: Redis = meter.store.redis  # type: ignore[attr-defined]
        accounts = [f"u_{uuid.uuid4().hex[:10]}" for _ in range(100)]
        await _delete(redis, prefix)
        try:
            for a in accounts:
                await meter.open_account(a, "pro")
            before = await _used(redis)
            await _run(meter, accounts, calls, keyed)
            results[keyed] = await _used(redis) - before
            if keyed:
                match = keyspace.idempotency_key(accounts[0], "", shards=meter.shards, prefix=prefix) + "*"
                sample = [k async for k in redis.scan_iter(match=match, count=1000)][:50]
                sizes = [int(await redis.memory_usage(k) or 0) for k in sample]
                one_key = sum(sizes) // max(len(sizes), 1)
        finally:
            await _delete(redis, prefix)
            await meter.close()
    per_call = (results[True] - results[False]) / calls
    print(f"calls: {calls} keyed and {calls} not, over 100 accounts; request ids are UUIDs, account ids "
          f"12 characters, key prefix 2 (the default's length)")
    print(f"one stored answer (MEMORY USAGE):  {one_key} bytes")
    print(f"extra per keyed call (INFO memory): {per_call:.0f} bytes (the key, and the id and record in the "
          f"journal entry until it is flushed)")
    print(f"per million keys held:              {one_key * 1_000_000 / MIB:.0f} MiB")
    for hours in (1, 6, 24):
        held = 1_000 * 3_600 * hours
        print(f"1,000 keyed calls/s, retention {hours:>2} h: {held / 1e6:.1f} M keys, "
              f"{one_key * held / (1024 * MIB):.1f} GiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--calls", type=int, default=20_000)
    args = parser.parse_args()
    asyncio.run(main(args.redis, args.calls))
