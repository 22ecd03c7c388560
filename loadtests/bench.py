"""`tokenmeter bench`: the hot path's benchmarks side by side, in one run, with their ratios.

    python3 dev.py tokenmeter bench [--quick] [--only script,meter] [--seconds 5] [--out DIR]

Starts a private `redis-server --port N --save '' --appendonly no` on a free loopback port (so
INFO commandstats and memory hold this run only) and stops it at the end; --redis-url uses that
Redis instead (under fresh key prefixes, removed after; other clients' traffic then counts too).
Sections (docs/PERFORMANCE.md says what each measures and why):

  script   redis-benchmark of the debit script (-c N, -c N -P 16) and of `return 1`; µs per call
  meter    meter.debit decisions/s, N concurrent callers
  limits   the `limits` library: fixed window, moving window, sliding window counter, N callers
  scale    meter.debit over 1, 1,000 and 1,000,000 accounts (100,000 with --quick), hot accounts;
           Redis memory per account
  http     HTTP debit vs the pure-ASGI and FastAPI bare endpoints (wrk), flusher in-process and external
  flusher  the flusher's rows/s into PostgreSQL vs raw COPY of the same rows

Prints each section as it runs, then one table and the ratios; writes bench.json, bench.txt and
bench.png into --out (default: a new temporary folder). Numbers, never assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from loadtests.bench_core import Run, section_limits, section_meter, section_script
from loadtests.bench_redis import PrivateRedis, delete_prefix
from loadtests.bench_report import table, write
from loadtests.bench_scale import section_scale
from loadtests.bench_services import section_flusher, section_http

SECTIONS: dict[str, Callable[[Run], Any]] = {  # in the order they run (the flusher last: it tunes the GC)
    "script": section_script, "meter": section_meter, "limits": section_limits, "scale": section_scale,
    "http": section_http, "flusher": section_flusher,
}


def parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenmeter bench", description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--redis-url", help="use this Redis instead of a private redis-server started for the run")
    p.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres",
                   help="PostgreSQL for the flusher section (a scratch database is created there and dropped)")
    p.add_argument("--seconds", type=float, default=None, help="each measurement (default 5; 2 with --quick)")
    p.add_argument("--concurrency", type=int, default=50, help="callers / redis-benchmark -c / wrk -c (default 50)")
    p.add_argument("--quick", action="store_true", help="a short run (CI smoke): 2 s measurements, 100k accounts")
    p.add_argument("--only", metavar="SECTION[,SECTION]", help=f"run only these: {', '.join(SECTIONS)}")
    p.add_argument("--out", metavar="DIR", help="where bench.json, bench.txt and bench.png go")
    return p


class Tee:
    """Writes to the console and to the run's detail log."""

    def __init__(self, *streams: TextIO) -> None:
        self.streams = streams

    def write(self, s: str) -> int:
        for st in self.streams:
            st.write(s)
        return len(s)

    def flush(self) -> None:
        for st in self.streams:
            st.flush()


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return f"{os.cpu_count()} cores, load {load:.1f} at start, {platform.system()} {platform.machine()}"


async def run_sections(run: Run, names: list[str]) -> None:
    for name in names:
        print(f"\n== {name} ==", flush=True)
        start = time.perf_counter()
        fn = SECTIONS[name]
        try:
            if asyncio.iscoroutinefunction(fn):
                result = await fn(run)
            else:  # http: bench_http runs event loops of its own, so from a thread, off this one
                result = await asyncio.to_thread(fn, run)
        except (Exception, SystemExit) as exc:  # one section failing does not lose the others' figures
            traceback.print_exc()
            result = {"skipped": f"failed: {type(exc).__name__}: {exc}"}
        run.results[name] = result
        print(f"   ({name}: {time.perf_counter() - start:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    names = list(SECTIONS) if not args.only else [s.strip() for s in args.only.split(",") if s.strip()]
    if unknown := [s for s in names if s not in SECTIONS]:
        p.error(f"unknown section(s) {', '.join(unknown)}; the sections: {', '.join(SECTIONS)}")
    if args.concurrency < 1:
        p.error("--concurrency must be at least 1")
    seconds = args.seconds if args.seconds is not None else (2.0 if args.quick else 5.0)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="tokenmeter-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    private = None if args.redis_url else PrivateRedis()
    url = args.redis_url or private.url  # type: ignore[union-attr]
    run = Run(redis_url=url, seconds=seconds, concurrency=args.concurrency, quick=args.quick,
              prefix=f"tmb{uuid.uuid4().hex[:6]}", pg_url=args.pg_url, private=private is not None, out=out)
    redis_note = (f"private: redis-server --port {private.port} --save '' --appendonly no (started for this run)"
                  if private else f"{url} (not private: other clients' commands count in its statistics)")
    meta: dict[str, Any] = {
        "command": shlex.join(["tokenmeter", "bench", *(argv if argv is not None else sys.argv[1:])]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), "redis": redis_note,
        "seconds": seconds, "concurrency": args.concurrency, "quick": args.quick, "sections": names,
        "python": platform.python_version(),
    }
    start = time.perf_counter()
    with (out / "detail.log").open("w") as log, contextlib.redirect_stdout(Tee(sys.stdout, log)):  # type: ignore[type-var]
        print(f"tokenmeter bench: {', '.join(names)}; {seconds:g} s each, concurrency {args.concurrency}; "
              f"redis: {redis_note}")
        try:
            with run.redis() as r:
                meta["redis_version"] = r.info("server")["redis_version"]
            asyncio.run(run_sections(run, names))
        finally:
            if private is not None:
                private.stop()
            else:
                with run.redis() as r:
                    for prefix in (run.prefix, f"{run.prefix}s", f"{run.prefix}lim"):
                        delete_prefix(r, prefix)
    meta["wall_seconds"] = time.perf_counter() - start
    text = table(run.results, meta)
    print("\n" + text, end="")
    for line in write(out, run.results, meta, text):
        print(line)
    failed = [n for n, r in run.results.items() if str(r.get("skipped", "")).startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
