"""Proxy benchmark: the same fake upstream called directly and through the metering proxy, in one run.

    python3 dev.py shell python -m loadtests.bench_proxy [--seconds 5] [--concurrency 32] [--streams 200]

Starts the fake upstream (loadtests/fake_llm.py) and `tokenmeter serve` with both upstreams pointed
at it, on free 127.0.0.1 ports, the meter on the real Redis (`--redis-url`, default
redis://127.0.0.1:6379/0) under a unique key prefix with a catalog whose plan has no daily cap,
and a temporary SQLite database with the in-process flusher. Then, with one httpx client process:

1. Time to first byte of a streamed chat completion (20 chunks), `--streams` calls one after the
   other, direct then proxied: p50 and p99, and the difference the proxy adds.
2. Non-streamed chat completions at `--concurrency` for `--seconds`, direct then proxied, then
   direct again (drift): req/s and the ratio proxy / direct.
3. The books: the tokens the proxied calls were charged against the usage the upstream reported.

The client, the fake and the proxy share the machine: the figures are ratios taken in one run,
never absolute claims. Removes its Redis keys and stops both servers at the end (also on error).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from loadtests.bench_http_app import CATALOG_TOML
from loadtests.fake_llm import UPSTREAM_KEY

ROOT = Path(__file__).resolve().parent.parent
MASTER_KEY = "bench-proxy-master-key-0123456789"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "benchmark words:20"}]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"bench_proxy: a server exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"bench_proxy: nothing listens on {port}")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def ttfb(client: httpx.AsyncClient, url: str, headers: dict[str, str], n: int) -> list[float]:
    """Seconds to the first byte of each of `n` streamed calls, one after the other."""
    out = []
    for _ in range(n):
        start = time.perf_counter()
        async with client.stream("POST", url, json={**BODY, "stream": True}, headers=headers) as r:
            if r.status_code != 200:
                raise SystemExit(f"bench_proxy: {url} answered {r.status_code}: {(await r.aread())[:300]!r}")
            first = 0.0
            async for _chunk in r.aiter_raw():
                first = first or time.perf_counter()
        out.append(first - start)
    return out


async def throughput(client: httpx.AsyncClient, url: str, headers: dict[str, str], seconds: float,
                     concurrency: int) -> tuple[float, int]:
    """(req/s, tokens reported by the upstream) of non-streamed calls at `concurrency` for `seconds`."""
    done, reported = 0, 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done, reported
        while time.perf_counter() < stop:
            r = await client.post(url, json=BODY, headers=headers)
            if r.status_code != 200:
                raise SystemExit(f"bench_proxy: {url} answered {r.status_code}: {r.text[:300]}")
            done += 1
            reported += int(r.json()["usage"]["total_tokens"])

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - start), reported


async def run(args: argparse.Namespace, tm: str, upstream: str) -> None:
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        account = f"bench-{uuid.uuid4().hex[:8]}"
        svc = {"Authorization": f"Bearer {MASTER_KEY}"}
        r = await client.post(f"{tm}/api/v1/meter/accounts", headers=svc, json={"account_id": account, "plan": "bench"})
        if r.status_code != 201:
            raise SystemExit(f"bench_proxy: opening the account: {r.status_code} {r.text}")
        direct = (f"{upstream}/v1/chat/completions", {"Authorization": f"Bearer {UPSTREAM_KEY}"})
        proxied = (f"{tm}/llm/openai/v1/chat/completions", {**svc, "X-Tokenmeter-Account": account})
        balance_url = f"{tm}/api/v1/meter/accounts/{account}/balance"
        before = int((await client.get(balance_url, headers=svc)).json()["remaining_tokens"])

        await ttfb(client, *direct, 10)  # warm both paths' connections
        await ttfb(client, *proxied, 10)
        t_direct = await ttfb(client, *direct, args.streams)
        t_proxy = await ttfb(client, *proxied, args.streams)
        rps_direct, _ = await throughput(client, *direct, args.seconds, args.concurrency)
        rps_proxy, reported = await throughput(client, *proxied, args.seconds, args.concurrency)
        rps_direct2, _ = await throughput(client, *direct, args.seconds, args.concurrency)

        streamed = (10 + args.streams) * int(
            (await client.post(direct[0], json=BODY, headers=direct[1])).json()["usage"]["total_tokens"])
        after = int((await client.get(balance_url, headers=svc)).json()["remaining_tokens"])

    ms = 1000.0
    print(f"\ntime to first byte, {args.streams} streamed calls one after the other (ms):")
    print(f"  {'':10} {'p50':>8} {'p99':>8}")
    print(f"  {'direct':10} {statistics.median(t_direct) * ms:8.2f} {_percentile(t_direct, 0.99) * ms:8.2f}")
    print(f"  {'proxied':10} {statistics.median(t_proxy) * ms:8.2f} {_percentile(t_proxy, 0.99) * ms:8.2f}")
    print(f"  proxy adds {(statistics.median(t_proxy) - statistics.median(t_direct)) * ms:.2f} ms at p50 "
          f"(ratio {statistics.median(t_proxy) / statistics.median(t_direct):.2f})")
    print(f"\nnon-streamed calls, {args.concurrency} concurrent, {args.seconds:g} s each (req/s):")
    print(f"  direct {rps_direct:9.0f}\n  proxied {rps_proxy:8.0f}\n  direct {rps_direct2:9.0f}  (again: drift)")
    print(f"  ratio proxied / direct: {rps_proxy / ((rps_direct + rps_direct2) / 2):.2f}")
    charged = before - after
    expected = reported + streamed
    print(f"\nbooks: charged {charged:,} tokens; the upstream reported {expected:,} -> "
          f"{'EXACT' if charged == expected else 'MISMATCH'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    prefix = f"tmbp{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "catalog.toml").write_text(CATALOG_TOML)
        up_port, tm_port = _free_port(), _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENMETER_")}
        env.update({"TOKENMETER_MASTER_KEY": MASTER_KEY, "TOKENMETER_KEY_PREFIX": prefix,
                    "TOKENMETER_REDIS_URL": args.redis_url, "TOKENMETER_CATALOG": f"{tmp}/catalog.toml",
                    "TOKENMETER_DATABASE_URL": f"sqlite:///{tmp}/bench.sqlite3", "PYTHONPATH": str(ROOT),
                    "TOKENMETER_UPSTREAM_OPENAI": f"http://127.0.0.1:{up_port}/v1",
                    "TOKENMETER_UPSTREAM_OPENAI_KEY": UPSTREAM_KEY, "TOKENMETER_REDIS_TIMEOUT_MS": "2000"})
        procs: list[subprocess.Popen[bytes]] = []
        try:
            log = open(f"{tmp}/servers.log", "wb")  # noqa: SIM115 - closed with the directory
            procs.append(subprocess.Popen([sys.executable, "-m", "loadtests.fake_llm", "--port", str(up_port)],
                                          cwd=ROOT, env=env, stdout=log, stderr=log))
            procs.append(subprocess.Popen([sys.executable, "-m", "api.cli", "serve", "--port", str(tm_port)],
                                          cwd=tmp, env=env, stdout=log, stderr=log))
            _wait(up_port, procs[0])
            _wait(tm_port, procs[1])
            print(f"fake upstream on :{up_port}, tokenmeter (proxy) on :{tm_port}, Redis {args.redis_url} "
                  f"prefix {prefix}")
            asyncio.run(run(args, f"http://127.0.0.1:{tm_port}", f"http://127.0.0.1:{up_port}"))
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
            _cleanup(args.redis_url, prefix)


def _cleanup(url: str, prefix: str) -> None:
    import redis

    client: Any = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    for i in range(0, len(keys), 500):
        client.delete(*keys[i:i + 500])
    client.close()


if __name__ == "__main__":
    main()
