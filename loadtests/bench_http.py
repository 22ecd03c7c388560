"""HTTP benchmark: `POST /api/v1/meter/debit` next to a bare JSON endpoint in the same server, in one run.

    python3 dev.py shell python -m loadtests.bench_http [--seconds 10] [--workers 1]

Starts the service itself (`python -m loadtests.bench_http --serve ...`, uvicorn with uvloop and
httptools, access log off) on a free 127.0.0.1 port, on the real Redis (`--redis-url`, default
redis://127.0.0.1:6379/0) under a unique key prefix, a temporary SQLite database, the in-process
flusher and a temporary catalog whose plan has no daily cap. The same app also serves
`POST /bare`, a FastAPI route: it parses the very same body (`DebitIn`) and returns a fixed JSON
of the debit response's size (its router is included after the service's). The debit
itself is served as pure ASGI ahead of the framework (api/fastpath.py), so the run also measures
`POST /bare-asgi`: the same parse and fixed JSON served the same pure-ASGI way (the fast path's
own body reader and JSON sender), which isolates
what the debit adds (service key, the meter call: one Redis script, its metered response).

1. Opens `--accounts` accounts (POST /api/v1/meter/accounts); requests are spread over them.
2. Peak: `wrk` (Debian package `wrk`) for `--seconds` against /bare, then the debit route, then
   /bare again (drift), then /bare-asgi, same threads and connections: req/s and the ratios.
3. Latency at 50% of the bare peak: the same wrk with a Lua `delay()` that paces each thread to a
   fixed schedule (an open loop while connections are free): p50/p99 of both routes. If debit
   cannot keep that rate, both routes again at 50% of the debit peak, for a like-for-like p99.
Between debit runs it waits for the flusher to catch up, so it does not steal CPU from the next run.
Each row also shows the server's CPU time per request (all its threads and workers, the in-process
flusher included, from /proc): steadier than req/s when other work shares the machine.
The flusher's lag is the library's own reader (persistence/backlog.py) over the settings' shards.
Prints the exact commands and the figures. Numbers, never assertions: machines are noisy.
Modules: bench_http_app.py (the server), bench_http_wrk.py (the wrk driver), bench_http_report.py.
Removes its Redis keys and temporary files and stops the server at the end (also on error).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from api.redact import mask_url
from loadtests.bench_http_app import BARE_ASGI_PATH, BARE_PATH, CATALOG_TOML, DEBIT_PATH, MASTER_KEY, serve
from loadtests.bench_http_report import paced, print_peak
from loadtests.bench_http_wrk import run_wrk

ROOT = Path(__file__).resolve().parent.parent
CHECK_PATH = "/api/v1/gateway/check"  # the gateway check (headers only), next to the JSON debit



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_server(args: argparse.Namespace, tmp: Path, prefix: str, port: int,
                 log: Any) -> tuple[subprocess.Popen[bytes], list[str]]:
    cmd = [sys.executable, "-m", "loadtests.bench_http", "--serve", "--port", str(port),
           "--workers", str(args.workers), "--redis-url", args.redis_url,
           "--database-url", f"sqlite:///{tmp / 'bench.sqlite3'}", "--catalog", str(tmp / "catalog.toml"),
           "--prefix", prefix, "--flusher", args.flusher]
    # its own session: on a stuck shutdown the whole group (uvicorn and its workers) is killed
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, cmd


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_ready(client: Any, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if client.get("/readyz").status_code == 200:
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server did not become ready in {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")


def open_accounts(base: str, n: int, concurrency: int = 32) -> None:
    import httpx

    async def run() -> None:
        todo = list(range(n))
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {MASTER_KEY}"},
                                     timeout=10) as client:
            async def opener() -> None:
                while todo:
                    a = todo.pop()
                    r = await client.post("/api/v1/meter/accounts",
                                          json={"account_id": f"bench-{a}", "plan": "bench"})
                    if r.status_code not in (200, 201):
                        raise SystemExit(f"opening account bench-{a} failed: {r.status_code} {r.text}")

            await asyncio.gather(*(opener() for _ in range(concurrency)))

    asyncio.run(run())


def unflushed(redis_url: str, prefix: str) -> int:
    """Journal entries the flusher has not acknowledged, over every shard the settings name."""
    from redis.asyncio import Redis

    from api.settings import Settings
    from persistence.backlog import backlog
    from persistence.flusher import FlusherConfig

    async def count() -> int:
        redis = Redis.from_url(redis_url)
        try:
            shards = await backlog(redis, shards=Settings().shards, prefix=prefix, group=FlusherConfig().group)
        finally:
            await redis.aclose()
        return sum(s.unflushed for s in shards)

    return asyncio.run(count())


def wait_flushed(redis_url: str, prefix: str, timeout: float = 180.0) -> str:
    start = time.monotonic()
    while (left := unflushed(redis_url, prefix)) and time.monotonic() - start < timeout:
        time.sleep(0.2)
    took = time.monotonic() - start
    return f"flusher caught up in {took:.1f} s" if not left else f"flusher still {left:,} entries behind"


def bench(args: argparse.Namespace) -> dict[str, Any]:
    """The run; prints it and returns its figures (wrk's, per route) for `tokenmeter bench`."""
    import httpx
    from redis import Redis

    redis = Redis.from_url(args.redis_url, decode_responses=True)
    try:
        redis.ping()
    except Exception as exc:
        raise SystemExit(f"no Redis at {args.redis_url} ({exc}): this benchmark needs the real Redis") from exc
    prefix = f"tmbench{uuid.uuid4().hex[:8]}"

    def drain() -> str:  # between debit runs: so the flusher does not steal CPU from the next run
        return wait_flushed(args.redis_url, prefix) if args.flusher == "inprocess" else "no flusher"

    tmp = Path(tempfile.mkdtemp(prefix="tmbench-http-"))
    (tmp / "catalog.toml").write_text(CATALOG_TOML)
    log_path = tmp / "server.log"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = None
    try:
        with log_path.open("wb") as log:
            proc, server_cmd = start_server(args, tmp, prefix, port, log)
        client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=10)
        wait_ready(client, proc, log_path)
        start = time.perf_counter()
        open_accounts(base, args.accounts)
        opened = time.perf_counter() - start
        body = {"account_id": "bench-0", "tokens": 1, "agent": "idea", "model": "haiku"}
        d, b = client.post(DEBIT_PATH, json=body), client.post(BARE_PATH, json=body)
        if d.status_code != 200 or b.status_code != 200:
            raise SystemExit(f"sanity check failed: debit {d.status_code} {d.text}; bare {b.status_code} {b.text}")
        client.close()
        pid = proc.pid

        cpus = os.cpu_count() or 0
        print("tokenmeter HTTP benchmark: POST /api/v1/meter/debit next to a bare POST /bare, same server")
        command = getattr(args, "command", None) or [sys.executable, "-m", "loadtests.bench_http", *sys.argv[1:]]
        print(f"command : {shlex.join(map(mask_url, command))}")
        print(f"server  : {shlex.join(map(mask_url, server_cmd))}")
        print(f"          uvicorn, loop=uvloop, http=httptools, access log off, {args.workers} worker(s); "
              f"Redis {mask_url(args.redis_url)} (prefix {prefix}), SQLite in {tmp}, flusher {args.flusher}")
        print(f"machine : {cpus} CPU cores shared by the server, Redis and wrk (load average "
              f"{os.getloadavg()[0]:.1f} at the start; anything else running skews the figures): absolute "
              "figures move run to run, compare the ratios")
        print(f"accounts: {args.accounts:,} opened on plan 'bench' (no daily cap) in {opened:.1f} s; "
              f"responses: debit {len(d.content)} bytes, bare {len(b.content)} bytes; "
              f"Idempotency-Key {'on (unique per request)' if args.idempotency else 'off'}")

        for path in (BARE_PATH, DEBIT_PATH):  # warm-up, not reported
            run_wrk(args, tmp, base, path, args.warmup)
        if args.flusher == "inprocess":
            wait_flushed(args.redis_url, prefix)

        bare, bare_cmd = run_wrk(args, tmp, base, BARE_PATH, args.seconds, server_pid=pid)
        debit, debit_cmd = run_wrk(args, tmp, base, DEBIT_PATH, args.seconds, server_pid=pid)
        drained = drain()
        again, _ = run_wrk(args, tmp, base, BARE_PATH, args.seconds, server_pid=pid)
        asgi, _ = run_wrk(args, tmp, base, BARE_ASGI_PATH, args.seconds, server_pid=pid)
        check, _ = run_wrk(args, tmp, base, CHECK_PATH, args.seconds, server_pid=pid, gateway=True)
        drain()
        peak = {"bare": bare, "debit": debit, "again": again, "asgi": asgi, "check": check}
        print_peak(args, peak, [bare_cmd, debit_cmd], drained)
        result: dict[str, Any] = {"peak": peak}

        target = bare["rps"] * 0.5
        pb, pd = paced(args, tmp, base, pid, drain, target, "at 50% of the bare peak")
        result["paced"] = {"target_rps": target, "bare": pb, "debit": pd}
        if pd["late"] > 0.01 * pd["requests"] or pd["rps"] < 0.95 * target:
            print("  note: the debit run fell behind the schedule (late sends / rate below target): 50% of "
                  f"the bare peak is more than debit sustains here (its peak {debit['rps']:,.0f} req/s), so "
                  "its figures are a saturated server's; wrk measures from the actual send, so they also "
                  "leave out the wait for a free connection")
            pb, pd = paced(args, tmp, base, pid, drain, debit["rps"] * 0.5,
                           "for comparison, both at 50% of the debit peak")
            result["paced_debit_peak"] = {"target_rps": debit["rps"] * 0.5, "bare": pb, "debit": pd}
        print("latency: wrk's figures, from writing the request to reading the whole response, over "
              f"{args.connections} keep-alive connections")
        return result
    finally:
        if proc is not None:
            stop_server(proc)
        keys = list(redis.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 500):
            redis.delete(*keys[i:i + 500])
        redis.close()
        if args.keep_log and log_path.exists():
            shutil.copy(log_path, args.keep_log)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--seconds", type=int, default=10, help="each measured wrk run")
    p.add_argument("--warmup", type=int, default=2, help="seconds of unreported load on each route first")
    p.add_argument("--workers", type=int, default=1, help="uvicorn workers (they share the real Redis)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads")
    p.add_argument("--connections", type=int, default=64, help="wrk connections")
    p.add_argument("--accounts", type=int, default=1_000)
    p.add_argument("--idempotency", action="store_true", help="send a unique Idempotency-Key per request")
    p.add_argument("--flusher", default="inprocess", choices=["inprocess", "external"],
                   help="external: no flusher runs (journal entries stay in Redis until cleanup)")
    p.add_argument("--keep-log", metavar="FILE", help="copy the server's log here at the end")
    p.add_argument("--wrk", default="wrk", help="the wrk executable")
    # the server side (started by the benchmark itself)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--database-url", help=argparse.SUPPRESS)
    p.add_argument("--catalog", help=argparse.SUPPRESS)
    p.add_argument("--prefix", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args)
        return
    exe = shutil.which(args.wrk)
    if exe is None:
        raise SystemExit("wrk not found: this benchmark drives the server with wrk (a Python client would be "
                         "the bottleneck). Install it: apt-get install -y wrk  (Debian/Ubuntu package `wrk`)")
    args.wrk = exe
    if args.workers < 1 or args.threads < 1 or args.connections < args.threads:
        raise SystemExit("--workers and --threads must be at least 1, --connections at least --threads")
    bench(args)


if __name__ == "__main__":
    main()
