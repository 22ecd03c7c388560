"""Do logins delay the meter? Debit latency with and without a concurrent login storm, in one run.

    python3 dev.py shell python -m loadtests.bench_login [--seconds 5] [--logins 8] [--rate 200]

Starts the service twice, one after the other, each on a free 127.0.0.1 port (uvicorn, uvloop,
httptools, access log off, one worker) on the real Redis (`--redis-url`, default
redis://127.0.0.1:6379/0) under a unique key prefix, a temporary SQLite database and a plan without a daily cap:

* `pool`: the service as it is: scrypt runs in the hasher's thread pool (`hash_threads`, 2);
* `on-loop`: the same service with the hasher patched to call scrypt directly on the event loop,
  as the service did before (so the figures of both are taken side by side on the same machine);
* the control: the pool with scrypt replaced by a 50 ms sleep: a login's wait without its CPU.
  What the pool row adds over this one is CPU contention (scrypt, the server, Redis and this load
  generator share the machine's cores), not a blocked loop.

For each, `--seconds` of paced debits alone (`--rate` per second from 4 senders, sequential
each), then the same debits while `--logins` clients log in back to back (correct password,
scrypt N=2^14 each). Prints p50/p99 of the debits in both phases, the ratio of the p99s, and the
logins per second achieved. Numbers, never assertions. Stops the servers and removes its Redis
keys and temporary files at the end (also on error).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from loadtests.bench_http import CATALOG_TOML, free_port, stop_server, wait_ready

ROOT = Path(__file__).resolve().parent.parent
MASTER_KEY = "tmbench-login-master-key"  # fixed: this server only lives for the run, on loopback
SETTINGS_ENV = "TOKENMETER_BENCH_LOGIN_SETTINGS"
INLINE_ENV = "TOKENMETER_BENCH_LOGIN_INLINE"  # "1": hash on the loop; "sleep": a CPU-free stand-in hash
PASSWORD = "bench-login-password-1"
SENDERS = 4
FREE_PLAN = """
[plans.free]   # registration opens the user on the free plan
name = "Free"
monthly_tokens = 10_000
price_inr_paise = 0
daily_requests = 100
requests_per_minute = 0
max_tokens_per_request = 8_192
rollover_pct = 50
"""


# -- the server (runs in the subprocess) -----------------------------------------------------------


def bench_app() -> Any:
    """uvicorn factory: the service from SETTINGS_ENV; with INLINE_ENV, hashing on the loop."""
    from api import hashing, security
    from api.app import create_app
    from api.settings import Settings

    if os.environ.get(INLINE_ENV) == "sleep":  # the control: a login's wait without its CPU
        def sleepy_verify(password: str, stored: str | None) -> bool:
            time.sleep(0.05)
            return True

        security.verify_password = sleepy_verify  # type: ignore[assignment]
    if os.environ.get(INLINE_ENV) == "1":
        async def hash_inline(self: Any, password: str) -> str:
            return security.hash_password(password)

        async def verify_inline(self: Any, password: str, stored: str | None) -> bool:
            return security.verify_password(password, stored or self._dummy)

        hashing.PasswordHasher.hash = hash_inline  # type: ignore[method-assign]
        hashing.PasswordHasher.verify = verify_inline  # type: ignore[method-assign]
    return create_app(Settings(**json.loads(os.environ[SETTINGS_ENV])))


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    os.environ[SETTINGS_ENV] = json.dumps({
        "redis_url": args.redis_url, "database_url": args.database_url, "key_prefix": args.prefix,
        "catalog": args.catalog, "master_key": MASTER_KEY, "redis_timeout_ms": 5000,  # a busy box: latency, not 503s
        "hash_threads": args.hash_threads,
        "register_per_address": 1_000_000, "register_global": 1_000_000, "login_max_failures": 1_000_000,
    })
    os.environ[INLINE_ENV] = args.mode
    uvicorn.run("loadtests.bench_login:bench_app", factory=True, host="127.0.0.1", port=args.port,
                loop="uvloop", http="httptools", access_log=False, log_level="warning")


# -- the benchmark (the parent process) ------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else float("nan")


async def debits(client: Any, account: str, seconds: float, rate: float) -> list[float]:
    """Paced debits from SENDERS senders; the latency of each, in ms."""
    latencies: list[float] = []
    headers = {"Authorization": f"Bearer {MASTER_KEY}"}
    body = {"account_id": account, "tokens": 1}
    interval = SENDERS / rate
    deadline = time.perf_counter() + seconds

    async def sender(offset: float) -> None:
        next_at = time.perf_counter() + offset
        while next_at < deadline:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            start = time.perf_counter()
            r = await client.post("/api/v1/meter/debit", json=body, headers=headers)
            latencies.append((time.perf_counter() - start) * 1000)
            if r.status_code != 200:
                raise SystemExit(f"debit answered {r.status_code}: {r.text}")
            next_at += interval

    await asyncio.gather(*(sender(i * interval / SENDERS) for i in range(SENDERS)))
    return latencies


async def login_storm(client: Any, email: str, clients: int, stop: asyncio.Event) -> int:
    done = 0

    async def one() -> None:
        nonlocal done
        while not stop.is_set():
            r = await client.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD})
            if r.status_code != 200:
                raise SystemExit(f"login answered {r.status_code}: {r.text}")
            done += 1

    await asyncio.gather(*(one() for _ in range(clients)))
    return done


async def measure(base: str, args: argparse.Namespace) -> dict[str, float]:
    import httpx

    limits = httpx.Limits(max_connections=SENDERS + args.logins + 4)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as client:
        account = f"bench-{uuid.uuid4().hex[:8]}"
        r = await client.post("/api/v1/meter/accounts", json={"account_id": account, "plan": "bench"},
                              headers={"Authorization": f"Bearer {MASTER_KEY}"})
        r.raise_for_status()
        email = f"bench-{uuid.uuid4().hex[:8]}@example.com"
        (await client.post("/api/v1/auth/register", json={"email": email, "password": PASSWORD})).raise_for_status()
        await debits(client, account, 1.0, args.rate)  # warm-up
        alone = await debits(client, account, args.seconds, args.rate)
        stop = asyncio.Event()
        storm = asyncio.create_task(login_storm(client, email, args.logins, stop))
        await asyncio.sleep(0.5)  # the storm is on before the debits are timed
        started = time.perf_counter()
        stormed = await debits(client, account, args.seconds, args.rate)
        stop.set()
        logins = await storm
        elapsed = time.perf_counter() - started + 0.5
    return {"alone_p50": pct(alone, 50), "alone_p99": pct(alone, 99), "storm_p50": pct(stormed, 50),
            "storm_p99": pct(stormed, 99), "logins_per_s": logins / elapsed, "n": len(alone) + len(stormed)}


def run_one(args: argparse.Namespace, tmp: Path, mode: str) -> dict[str, float]:
    import subprocess

    import httpx

    port = free_port()
    prefix = f"tmbenchlogin{uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, "-m", "loadtests.bench_login", "--serve", "--port", str(port),
           "--redis-url", args.redis_url, "--database-url", f"sqlite:///{tmp / f'{prefix}.sqlite3'}",
           "--catalog", str(tmp / "catalog.toml"), "--prefix", prefix,
           "--hash-threads", str(args.hash_threads), "--mode", mode]
    log_path = tmp / f"{prefix}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            base = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=base, timeout=5) as client:
                wait_ready(client, proc, log_path)
            return asyncio.run(measure(base, args))
        finally:
            stop_server(proc)
            _drop_keys(args.redis_url, prefix)


def _drop_keys(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i:i + 500])
    finally:
        client.close()


def bench(args: argparse.Namespace) -> None:
    from api.redact import mask_url

    print("tokenmeter login benchmark: debit latency with and without a concurrent login storm")
    print(f"command : {' '.join(map(mask_url, [sys.executable, '-m', 'loadtests.bench_login', *sys.argv[1:]]))}")
    print(f"load    : debits paced at {args.rate:.0f}/s from {SENDERS} senders for {args.seconds:.0f} s, alone and "
          f"with {args.logins} clients logging in back to back; Redis {mask_url(args.redis_url)}, SQLite, "
          f"1 uvicorn worker; {os.cpu_count()} CPU cores shared with this load generator")
    with tempfile.TemporaryDirectory(prefix="tm-bench-login-") as tmp:
        (Path(tmp) / "catalog.toml").write_text(CATALOG_TOML + FREE_PLAN)  # a plan without a daily cap
        rows = [(f"pool ({args.hash_threads} threads)", run_one(args, Path(tmp), "pool")),
                ("on-loop (as before)", run_one(args, Path(tmp), "1")),
                ("pool, 50 ms sleep hash", run_one(args, Path(tmp), "sleep"))]
    print(f"\n{'hashing':22s} {'alone p50/p99 ms':>18s} {'storm p50/p99 ms':>18s} {'p99 storm/alone':>16s} "
          f"{'logins/s':>9s}")
    for label, f in rows:
        print(f"{label:22s} {f['alone_p50']:8.2f}/{f['alone_p99']:<9.2f} {f['storm_p50']:8.2f}/{f['storm_p99']:<9.2f} "
              f"{f['storm_p99'] / f['alone_p99']:16.2f} {f['logins_per_s']:9.1f}")
    pool, inline = rows[0][1], rows[1][1]
    print(f"\nunder the storm, debit p99 on-loop / pool = {inline['storm_p99'] / pool['storm_p99']:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rate", type=float, default=200.0, help="debits per second")
    p.add_argument("--logins", type=int, default=8, help="concurrent login clients")
    p.add_argument("--hash-threads", type=int, default=2, help="the service's hash_threads (pool run)")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="pool", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--database-url", help=argparse.SUPPRESS)
    p.add_argument("--prefix", help=argparse.SUPPRESS)
    p.add_argument("--catalog", help=argparse.SUPPRESS)
    args = p.parse_args()
    serve(args) if args.serve else bench(args)


if __name__ == "__main__":
    main()
