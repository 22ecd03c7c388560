"""The service-side sections of `tokenmeter bench`, run by the existing benchmarks:

* `http`: loadtests/bench_http.py (uvicorn, 1 worker, wrk -t2 -c<concurrency>) on the bench's
  Redis, once with the flusher in the server's process and once with it outside (`external`:
  the server runs none; deployed, it runs in its own process, elsewhere, so here the journal
  entries simply wait in Redis until the end). Skipped, saying so, when wrk is missing.
* `flusher`: loadtests/bench_flusher.py (a backlog of real debits drained into a scratch
  PostgreSQL database, then the same rows by raw COPY, then the lag at 50% load). Skipped,
  saying so, when PostgreSQL does not answer at --pg-url.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
from typing import Any

from loadtests.bench_core import Run

WRK_MISSING = "wrk not installed (Debian package: apt-get install -y wrk)"


def section_http(run: Run) -> dict[str, Any]:
    from loadtests import bench_http

    exe = shutil.which("wrk")
    if exe is None:
        print(f"  skipped: {WRK_MISSING}")
        return {"skipped": WRK_MISSING}
    out: dict[str, Any] = {}
    for flusher in ("inprocess", "external"):
        args = argparse.Namespace(
            redis_url=run.redis_url, seconds=max(1, round(run.seconds)), warmup=1 if run.quick else 2, workers=1,
            threads=2, connections=max(2, run.concurrency), accounts=200 if run.quick else 1_000,
            idempotency=False, flusher=flusher, keep_log=None, wrk=exe,
            command=[sys.executable, "-m", "loadtests.bench_http", "--flusher", flusher])
        print(f"\n  -- HTTP, flusher {flusher} --")
        out[flusher] = bench_http.bench(args)
    return out


async def _postgres_answers(url: str) -> str:
    import asyncpg

    try:
        conn = await asyncio.wait_for(asyncpg.connect(url), 5)
    except Exception as exc:
        return f"PostgreSQL does not answer at {url} ({type(exc).__name__}: {exc})"
    await conn.close()
    return ""


async def section_flusher(run: Run) -> dict[str, Any]:
    from loadtests import bench_flusher
    from persistence.flusher import FlusherConfig

    if why := await _postgres_answers(run.pg_url):
        print(f"  skipped: {why}")
        return {"skipped": why}
    args = argparse.Namespace(redis_url=run.redis_url, pg=run.pg_url, entries=30_000 if run.quick else 200_000,
                              accounts=1_000, batch=FlusherConfig().batch, load_seconds=run.seconds, flushers=1)
    return await bench_flusher.main_async(args)
