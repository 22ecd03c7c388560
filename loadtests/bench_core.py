"""The Redis-side sections of `tokenmeter bench`, each on the same Redis at the same concurrency:

* `script`: `redis-benchmark` running EVALSHA of the very debit script a `meter.debit` sends (its
  KEYS and ARGV taken from a real call, so they follow the script), `-c 50` and `-c 50 -P 16`,
  and a trivial script (`return 1`) for the floor; Redis µs per call from INFO commandstats.
* `meter`: `meter.debit` decisions/s from this process with `--concurrency` callers.
* `limits`: the `limits` library (async, redis-py) hitting fixed window, moving window and
  sliding window counter limits the run never reaches, one key, like the one account above.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis import Redis

from loadtests.bench_debit import BENCH_CATALOG as _BASE_CATALOG
from loadtests.bench_redis import counters, delta, redis_benchmark
from meter import Meter
from meter._catalog import parse_catalog

# One plan that never runs dry nor caps a day within a run: every call is an admitted debit.
BENCH_CATALOG: dict[str, Any] = {
    **_BASE_CATALOG,
    "plans": {"bench": {"name": "Bench", "monthly_tokens": 10**15, "price_inr_paise": 0, "daily_requests": 0,
                        "requests_per_minute": 0, "max_tokens_per_request": 8192}},
}
ACCOUNT = "bench-user"
TRIVIAL_SCRIPT = "return 1"


@dataclass
class Run:
    """What every section shares: the Redis, the run's settings, the results so far."""

    redis_url: str
    seconds: float
    concurrency: int
    quick: bool
    prefix: str
    pg_url: str
    private: bool  # the Redis was started by the bench (clean statistics)
    out: Path | None = None
    results: dict[str, Any] = field(default_factory=dict)

    def redis(self) -> Redis:
        return Redis.from_url(self.redis_url, decode_responses=True)

    async def meter(self, prefix: str = "") -> Meter:
        return await Meter.connect(self.redis_url, prefix=prefix or self.prefix, timeout_ms=10_000,
                                   connect_timeout_ms=2_000, catalog=parse_catalog(BENCH_CATALOG))


def captured_call(meter: Meter) -> list[tuple[str, list[str], list[str | int]]]:
    """Record the store calls a Meter makes from now on (op, KEYS, ARGV)."""
    calls: list[tuple[str, list[str], list[str | int]]] = []
    call = meter.store.call

    def spy(op: str, keys: Sequence[str], argv: Sequence[str | int]) -> Any:
        calls.append((op, list(keys), list(argv)))
        return call(op, keys, argv)

    meter.store.call = spy  # type: ignore[method-assign]
    return calls


async def debit_command(meter: Meter, account: str) -> list[str | int]:
    """EVALSHA <sha> <numkeys> KEYS... ARGV... exactly as `meter.debit(account, 1)` sends it."""
    calls = captured_call(meter)
    await meter.debit(account, 1, agent="idea", model="haiku")
    del meter.store.call  # back to the class's method
    op, keys, argv = next(c for c in calls if c[0] == "debit")
    sha = meter.store.registry[op].sha  # type: ignore[attr-defined]
    return ["EVALSHA", sha, len(keys), *keys, *argv]


def measured_benchmark(run: Run, command: Sequence[str | int], pipeline: int) -> dict[str, Any]:
    """redis-benchmark for about `--seconds` (a short calibration run first), with the server's
    figures for the measured run."""
    redis = run.redis()
    try:
        probe = redis_benchmark(run.redis_url, command, 5_000, run.concurrency, pipeline)
        requests = max(5_000, int(probe["rps"] * run.seconds))
        before = counters(redis)
        res = redis_benchmark(run.redis_url, command, requests, run.concurrency, pipeline)
        res.update(delta(before, counters(redis), requests))
    finally:
        redis.close()
    return res


async def section_script(run: Run) -> dict[str, Any]:
    meter = await run.meter()
    try:
        await meter.open_account(ACCOUNT, plan="bench")
        debit = await debit_command(meter, ACCOUNT)
    finally:
        await meter.close()
    redis = run.redis()
    trivial = ["EVALSHA", redis.script_load(TRIVIAL_SCRIPT), 0]
    redis.close()
    out = {"debit_c": measured_benchmark(run, debit, 1), "debit_p16": measured_benchmark(run, debit, 16),
           "trivial_c": measured_benchmark(run, trivial, 1), "trivial_p16": measured_benchmark(run, trivial, 16)}
    for name, r in out.items():
        print(f"  redis-benchmark {name:<12} {r['rps']:>10,.0f}/s   {r['usec_per_call']:6.2f} µs/call in Redis")
    return out


async def drive(concurrency: int, seconds: float, one: Callable[[int], Any]) -> tuple[int, float]:
    """`concurrency` callers calling `one(i)` (i counts calls) for `seconds`; (calls, elapsed)."""
    stop = time.perf_counter() + seconds
    done = 0

    async def caller() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await one(done)
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return done, time.perf_counter() - start


async def meter_rate(run: Run, meter: Meter, pick: Callable[[int], str], seconds: float | None = None
                     ) -> dict[str, Any]:
    """Decisions/s of `meter.debit(pick(i), 1)`, with the server's figures; every call must be admitted."""
    async def one(i: int) -> None:
        d = await meter.debit(pick(i), 1, agent="idea", model="haiku")
        if not d.allowed:
            raise RuntimeError(f"bench: a debit was refused, the run measures admitted debits only: {d}")

    redis = run.redis()
    try:
        before = counters(redis)
        n, took = await drive(run.concurrency, run.seconds if seconds is None else seconds, one)
        res: dict[str, Any] = {"rps": n / took, "decisions": n, "seconds": took, "concurrency": run.concurrency}
        res.update(delta(before, counters(redis), n))
    finally:
        redis.close()
    return res


async def section_meter(run: Run) -> dict[str, Any]:
    meter = await run.meter()
    try:
        await meter.open_account(ACCOUNT, plan="bench")
        await meter_rate(run, meter, lambda i: ACCOUNT, min(1.0, run.seconds))  # warm-up, not reported
        res = await meter_rate(run, meter, lambda i: ACCOUNT)
    finally:
        await meter.close()
    print(f"  meter.debit, {run.concurrency} callers   {res['rps']:>10,.0f}/s   "
          f"{res['usec_per_call']:6.2f} µs/call in Redis")
    return {"debit": res}


LIMITS_STRATEGIES = ("fixed_window", "moving_window", "sliding_window_counter")


async def section_limits(run: Run) -> dict[str, Any]:
    try:
        import limits
        from limits.aio import strategies
        from limits.aio.storage import RedisStorage
    except ImportError:
        print("  skipped: the `limits` library is not installed (pip install 'limits>=5', in the dev extras)")
        return {"skipped": "limits not installed"}
    # redis-py (with hiredis), the client the meter uses; limits' own default would be coredis
    storage = RedisStorage(f"async+{run.redis_url}", implementation="redispy", key_prefix=f"{run.prefix}lim")
    item = limits.parse("1000000000/hour")  # never reached: every hit is admitted, like the debits
    classes = {"fixed_window": strategies.FixedWindowRateLimiter,
               "moving_window": strategies.MovingWindowRateLimiter,
               "sliding_window_counter": strategies.SlidingWindowCounterRateLimiter}
    out: dict[str, Any] = {"version": limits.__version__}
    redis = run.redis()
    try:
        for name in LIMITS_STRATEGIES:
            limiter = classes[name](storage)

            async def one(i: int, limiter: Any = limiter, name: str = name) -> None:
                if not await limiter.hit(item, ACCOUNT, name):
                    raise RuntimeError(f"bench: limits refused a hit ({name})")

            await drive(run.concurrency, min(1.0, run.seconds), one)  # warm-up: scripts loaded, pool full
            before = counters(redis)
            n, took = await drive(run.concurrency, run.seconds, one)
            res: dict[str, Any] = {"rps": n / took, "decisions": n, "seconds": took}
            res.update(delta(before, counters(redis), n))
            out[name] = res
            print(f"  limits {name:<24} {res['rps']:>10,.0f}/s   {res['usec_per_call']:6.2f} µs/call in Redis")
    finally:
        redis.close()
        await storage.reset()
    return out


def spread(accounts: Sequence[str], hot: Sequence[str] = (), hot_share: float = 0.0) -> Callable[[int], str]:
    """An account chooser: uniform over `accounts`, or `hot_share` of the calls on `hot`."""
    rng = random.Random(16)
    n, h = len(accounts), len(hot)
    if h:
        return lambda i: hot[rng.randrange(h)] if rng.random() < hot_share else accounts[rng.randrange(n)]
    return lambda i: accounts[rng.randrange(n)]
