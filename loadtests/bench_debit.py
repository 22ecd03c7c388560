"""Side-by-side debit benchmark: `meter.debit` from one Python process next to `redis-benchmark`
running the very same debit script (same SHA, same keys, same arguments) on the same Redis.

    python3 dev.py bench [--redis-url redis://127.0.0.1:6379/0] [--seconds 5] [--concurrency 64 128 256]

Prints decisions/s for each side and the ratio. Numbers, never assertions: machines are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import time
import uuid
from urllib.parse import urlparse

from meter import Meter, SystemClock
from meter._catalog import parse_catalog
from meter._clock import month_index

BENCH_CATALOG = {
    "inr_paise_per_usd": 8300,
    "plans": {"bench": {"name": "Bench", "monthly_tokens": 1_000, "price_inr_paise": 0,
                        "daily_requests": 0, "max_tokens_per_request": 8192}},
    "packs": {"p": {"name": "P", "tokens": 1, "price_inr_paise": 1}},
    "promo_codes": {"X": {"bonus_tokens": 1}},
    "models": {"haiku": {"name": "H", "input_usd_micros_per_mtok": 1, "output_usd_micros_per_mtok": 1}},
    "agents": {"idea": {"name": "I", "estimate_tokens": 1, "model": "haiku"}},
}


async def _setup(url: str, prefix: str, account: str) -> Meter:
    meter = await Meter.connect(url, prefix=prefix, catalog=parse_catalog(BENCH_CATALOG))
    await meter.open_account(account, plan="bench")
    await meter.credit(account, 2**50, bucket="premium", kind="grant")
    return meter


async def _cleanup(meter: Meter, prefix: str) -> None:
    client = meter.store.redis  # type: ignore[attr-defined]
    keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
    if keys:
        await client.delete(*keys)
    await meter.close()


def redis_benchmark(url: str, meter: Meter, account: str, requests: int, clients: int,
                    pipeline: int = 1) -> float:
    """redis-benchmark -c clients running EVALSHA of the debit script; returns requests/s."""
    exe = shutil.which("redis-benchmark")
    if exe is None:
        raise SystemExit("redis-benchmark not found (Debian package redis-tools)")
    u = urlparse(url)
    now = SystemClock().now_ms()
    keys = meter._keys(account, "")
    argv = [account, now, month_index(now), now // 86_400_000, "", "", 1, "idea", "haiku", "", "", ""]
    sha = meter.store.registry["debit"].sha  # type: ignore[attr-defined]
    cmd = [exe, "-h", u.hostname or "127.0.0.1", "-p", str(u.port or 6379), "-n", str(requests),
           "-c", str(clients), "-P", str(pipeline), "-q", "--csv",
           "EVALSHA", sha, str(len(keys)), *keys, *(str(a) for a in argv)]
    if u.path not in ("", "/"):
        cmd[1:1] = ["--dbnum", u.path.strip("/")]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = re.findall(r'"([0-9.]+)"', out.splitlines()[-1])
    return float(rps[0])


async def meter_debits(meter: Meter, account: str, concurrency: int, seconds: float) -> float:
    """Decisions/s of `meter.debit` with `concurrency` callers in this process."""
    stop = time.perf_counter() + seconds
    done = 0

    async def caller() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            d = await meter.debit(account, 1, agent="idea", model="haiku")
            if not d.allowed:
                raise RuntimeError(f"benchmark account ran dry: {d}")
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return done / (time.perf_counter() - start)


async def main_async(args: argparse.Namespace) -> None:
    prefix = f"tmbench{uuid.uuid4().hex[:8]}"
    account = "bench-user"
    meter = await _setup(args.redis_url, prefix, account)
    try:
        await meter.debit(account, 1)  # loads the script
        baseline = redis_benchmark(args.redis_url, meter, account, args.requests, 50)
        print(f"redis-benchmark -c 50, debit script       : {baseline:10,.0f} decisions/s")
        for c in args.concurrency:
            rate = await meter_debits(meter, account, c, args.seconds)
            print(f"meter.debit, {c:3d} concurrent callers      : {rate:10,.0f} decisions/s"
                  f"   ratio {rate / baseline:.2f}")
        again = redis_benchmark(args.redis_url, meter, account, args.requests, 50)
        print(f"redis-benchmark -c 50 (again, for drift)  : {again:10,.0f} decisions/s")
        piped = redis_benchmark(args.redis_url, meter, account, args.requests, 50, pipeline=16)
        print(f"redis-benchmark -c 50 -P 16 (ceiling)     : {piped:10,.0f} decisions/s")
    finally:
        await _cleanup(meter, prefix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--requests", type=int, default=200_000, help="redis-benchmark requests")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args()
    if not args.no_uvloop:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
