"""What the debit script costs inside Redis, in machine instructions, counted by callgrind: the
same figure on every run whatever else the machine does (wall-clock µs vary by 30% on a shared box).

    python3 dev.py shell python -m loadtests.script_cost [--calls 2000]

Starts `valgrind --tool=callgrind redis-server` on a free loopback port (valgrind and
redis-server and redis-benchmark from Debian), opens one account, then for each variant runs
`--calls` and 2 x `--calls` EVALSHAs (redis-benchmark, -P 50) between a zeroing and a dump of
the counters; the difference / calls is the cost of one call, with the server's fixed costs cancelled out.

Variants, each the debit script cut at a point, so the differences are the stages' costs:
  trivial                  `return 1` with the same 18 arguments: the command's own floor
  preamble                 the wallet library defined (its closures, tables), nothing run
  + account read           the HMGET of the hot fields and the account table built
  debit                    the whole debit without an idempotency key (no loader: the library's use)
  debit, service path      with the verified set (the service rehydrates: K_LIVE, and INFO server for run_id)
  debit, service, keyed    and a new Idempotency-Key per call (GET, then SET of the answer)
Stops the server and removes its files at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from loadtests.bench_debit import BENCH_CATALOG
from meter import Meter, SystemClock
from meter._catalog import parse_catalog
from meter._clock import month_index

CUT = "local tokens = tonumber(ARGV[7])"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _instructions(pid: int, out_dir: Path, run: Any) -> int:
    """Instructions the server executed during run()."""
    subprocess.run(["callgrind_control", "-z", str(pid)], capture_output=True, check=False)
    run()
    for f in glob.glob(str(out_dir / "cg.out*")):
        Path(f).unlink()
    subprocess.run(["callgrind_control", "-d", str(pid)], capture_output=True, check=False)
    time.sleep(0.3)
    total = 0
    for f in glob.glob(str(out_dir / "cg.out*")):
        for line in Path(f).read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                total = max(total, int(line.split()[1]))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control", "redis-server", "redis-benchmark"):
        if shutil.which(tool) is None:
            raise SystemExit(f"script_cost: {tool} not found (Debian packages valgrind, redis-server, redis-tools)")
    port = _free_port()
    tmp = Path(tempfile.mkdtemp(prefix="tm-script-cost-"))
    server = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg.out", "redis-server",
                               "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                               "--dir", str(tmp)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    try:
        for _ in range(300):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)

        async def setup() -> Meter:
            meter = await Meter.connect(f"redis://127.0.0.1:{port}/0", prefix="tmsc", timeout_ms=10_000,
                                        connect_timeout_ms=10_000, catalog=parse_catalog(BENCH_CATALOG))
            await meter.open_account("acct", plan="bench")
            await meter.credit("acct", 2**50, bucket="premium", kind="grant")
            await meter.close()
            return meter

        meter = asyncio.run(setup())
        text = meter.store.registry["debit"].text  # type: ignore[attr-defined]
        keys = list(meter._keys("acct", ""))[:6]
        live = keys[3].rsplit(":", 1)[0] + ":live"  # the shard's verified set: same hash tag
        client.sadd(f"{live}:{client.info('server')['run_id']}", "acct")
        now = SystemClock().now_ms()
        argv = ["acct", now, month_index(now), now // 86_400_000, "", "", 1, "idea", "haiku", "", "", ""]
        # a new request id per call: redis-benchmark fills each __rand_int__ (the idempotency key's
        # name in KEYS, the id in ARGV) with a random number
        keyed = [*argv[:4], "req-__rand_int__", "0" * 16, *argv[6:]]
        variants = [
            ("trivial", "return 1", keys, argv),
            ("preamble", text.replace(CUT, "do return 1 end\n" + CUT), keys, argv),
            ("+ account read", text.replace(CUT, "do local a = load_account() return 1 end\n" + CUT), keys, argv),
            ("debit", text, keys, argv),
            ("debit, service path", text, [*keys, live], argv),
            ("debit, service, keyed", text, [*keys[:5], keys[5] + "req-__rand_int__", live], keyed),
        ]
        results: list[tuple[str, float]] = []
        for name, source, k, a in variants:
            sha = client.script_load(source)

            def run(n: int, sha: str = sha, k: list[str] = k, a: list[Any] = a) -> None:
                subprocess.run(["redis-benchmark", "-p", str(port), "-n", str(n), "-c", "1", "-P", "50", "-q",
                                "-r", "1000000000", "EVALSHA", sha, str(len(k)), *k, *map(str, a)],
                               capture_output=True, check=True)

            one = _instructions(server.pid, tmp, lambda: run(args.calls))
            two = _instructions(server.pid, tmp, lambda: run(2 * args.calls))
            client.delete(keys[4])  # the journal stream: every variant starts from an empty one
            results.append((name, (two - one) / args.calls))
            print(f"{name:28s} {results[-1][1]:10,.0f} instructions per call", flush=True)
        full = dict(results)
        rest = full["debit"] - full["+ account read"]
        print(f"\nstages of the debit: preamble {full['preamble'] - full['trivial']:,.0f}, account read "
              f"{full['+ account read'] - full['preamble']:,.0f}, the rest {rest:,.0f};"
              f" the service path adds {full['debit, service path'] - full['debit']:,.0f} (verified set + INFO), a key "
              f"{full['debit, service, keyed'] - full['debit, service path']:,.0f}")
    finally:
        client.close()
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
