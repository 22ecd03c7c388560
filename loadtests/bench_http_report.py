"""The report of loadtests/bench_http.py: one row per wrk run (req/s, p50/p99, server CPU per
request, errors) and the paced latency comparison of both routes."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from loadtests.bench_http_app import BARE_PATH, DEBIT_PATH
from loadtests.bench_http_wrk import run_wrk


def fmt_errors(f: dict[str, float]) -> str:
    if not f["errors"]:
        return ""
    parts = [f"{k.replace('_', ' ')} {int(f[k]):,}" for k in ("status_errors", "connect_errors",
                                                              "read_errors", "write_errors", "timeouts") if f[k]]
    return "   ERRORS: " + ", ".join(parts)


def row(label: str, f: dict[str, float], extra: str = "") -> str:
    return (f"  {label:<34}{f['rps']:>10,.0f}{f['p50_us'] / 1000:>10.2f}{f['p99_us'] / 1000:>10.2f}"
            f"{f['cpu_us']:>10,.0f}{extra}{fmt_errors(f)}")


def paced(args: argparse.Namespace, tmp: Path, base: str, pid: int, drain: Callable[[], str],
          target: float, title: str) -> tuple[dict[str, float], dict[str, float]]:
    """Both routes at a fixed `target` req/s; prints p50/p99 and returns the (bare, debit) figures."""
    per_thread = target / args.threads
    pb, cmd = run_wrk(args, tmp, base, BARE_PATH, args.seconds, per_thread, pid)
    pd, _ = run_wrk(args, tmp, base, DEBIT_PATH, args.seconds, per_thread, pid)
    drained = drain()
    print(f"\n{title}: {target:,.0f} req/s target ({per_thread:,.0f} per wrk thread, Lua delay() pacing), "
          f"{args.seconds} s each")
    print(f"load    : {cmd}  (and the same for {DEBIT_PATH})")
    print(f"{'':<36}req/s   p50 ms    p99 ms  CPU µs/req")
    for label, f in (("bare   POST /bare", pb), ("debit  POST /api/v1/meter/debit", pd)):
        print(row(label, f, f"   late sends {int(f['late']):,}" if f["late"] else ""))
    print(f"  p99 debit - bare: {(pd['p99_us'] - pb['p99_us']) / 1000:+.2f} ms;  "
          f"p50 debit - bare: {(pd['p50_us'] - pb['p50_us']) / 1000:+.2f} ms   ({drained} after)")
    return pb, pd



def print_peak(args: argparse.Namespace, runs: dict[str, dict[str, float]], commands: list[str],
               drained: str) -> None:
    """The peak table: bare, debit, bare again (drift), the pure-ASGI bare; and their ratios."""
    bare, debit, again, asgi = runs["bare"], runs["debit"], runs["again"], runs["asgi"]
    print(f"\nload    : {commands[0]}")
    print(f"          {commands[1]}")
    print(f"\npeak, {args.seconds} s each, wrk -t{args.threads} -c{args.connections}"
          f"{'':<6}req/s   p50 ms    p99 ms  CPU µs/req")
    print(row("bare   POST /bare", bare))
    print(row("debit  POST /api/v1/meter/debit", debit, f"   ({drained} after)"))
    print(row("bare   again (drift)", again))
    print(row("bare   POST /bare-asgi (pure ASGI)", asgi))
    check = runs.get("check")
    if check:
        print(row("check  GET /api/v1/gateway/check", check))
    print(f"  ratio debit / bare: {debit['rps'] / bare['rps']:.2f}   (against the second bare run: "
          f"{debit['rps'] / again['rps']:.2f})")
    print(f"  ratio debit / bare pure-ASGI endpoint: {debit['rps'] / asgi['rps']:.2f}   (the debit is "
          "served as pure ASGI by api/fastpath.py; this is what the meter call itself costs)")
    if check:
        print(f"  ratio gateway check / JSON debit: {check['rps'] / debit['rps']:.2f}   (the same meter call "
              "from headers, through FastAPI's router rather than the debit's pure-ASGI fast path)")
    if bare["cpu_us"] and debit["cpu_us"]:
        print(f"  server CPU per request debit / bare: {debit['cpu_us'] / bare['cpu_us']:.2f}  (CPU time of the "
              "server process, in-process flusher included: steadier than req/s on a busy machine)")
