"""`tokenmeter loadtest`: Locust headless against a service it starts (or --url), bounded in users
and time, then the books: for every account touched, charged per the answers = balance decrease
= the ledger's usage rows, no transaction twice, reconcile clean. Prints PASS or FAIL with the
numbers; exit 0 or 1.

    python3 dev.py tokenmeter loadtest --users 40 --run-time 30 [--redis-url ...] [--database-url ...]

Without --url it starts `tokenmeter serve` on a free loopback port: the given Redis (default:
embedded) under a fresh key prefix, the given database (default: a SQLite file in the output
folder), registration limits raised for the run's users, a test-provider secret so buyers can
pay. Locust writes `<out>/locust_stats.csv` (and the rest of its CSVs) and `<out>/report.html`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _service_env(args: argparse.Namespace, out: Path, key: str, pay_secret: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENMETER_")
           and k not in ("REDIS_URL", "DATABASE_URL")}
    env.update({"TOKENMETER_MASTER_KEY": key, "TOKENMETER_TEST_PAYMENT_SECRET": pay_secret,
                "TOKENMETER_DATABASE_URL": args.database_url or f"sqlite:///{out / 'loadtest.sqlite3'}",
                "TOKENMETER_KEY_PREFIX": f"lt{uuid.uuid4().hex[:8]}",
                "TOKENMETER_REGISTER_PER_ADDRESS": "1000000", "TOKENMETER_REGISTER_GLOBAL": "1000000",
                "TOKENMETER_PROMO_MAX_FAILURES": "1000000", "PYTHONPATH": str(ROOT)})
    if args.redis_url:
        env["TOKENMETER_REDIS_URL"] = args.redis_url
    return env


def _wait_healthy(base: str, proc: subprocess.Popen[bytes] | None, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"loadtest: the service exited with {proc.returncode}")
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("loadtest: the service did not come up")


def _run_locust(args: argparse.Namespace, base: str, out: Path, key: str, pay_secret: str) -> int:
    env = {**os.environ, "TOKENMETER_MASTER_KEY": key, "LOADTEST_ACCOUNTS": str(args.accounts),
           "LOADTEST_TEST_PAYMENT_SECRET": pay_secret, "LOADTEST_BOOKS": str(out / "books.json"),
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", base,
           "-u", str(args.users), "-r", str(args.spawn_rate), "--run-time", f"{args.run_time}s",
           "--stop-timeout", "5", "--csv", str(out / "locust"), "--html", str(out / "report.html"),
           "--only-summary", "--loglevel", "WARNING", "--exit-code-on-error", "0"]
    print("loadtest: " + " ".join(cmd), flush=True)
    # bounded: the run time, the provisioning and the stop, with room to spare
    return subprocess.call(cmd, env=env, timeout=args.run_time + 300)


async def _ledger(database_url: str, accounts: list[str], setup: set[str]) -> dict[str, dict[str, Any]]:
    from sqlalchemy import select

    from persistence.db import Database
    from persistence.models import TokenTransaction as T

    db = Database(database_url)
    out: dict[str, dict[str, Any]] = {}
    try:
        async with db.sessions() as session:
            for i in range(0, len(accounts), 500):
                q = select(T.account_id, T.transaction_id, T.transaction_type, T.tokens_changed, T.held_changed,
                           T.request_id).where(T.account_id.in_(accounts[i:i + 500]),
                                               T.transaction_type.in_(("usage", "settle")))
                for account, tid, _kind, changed, held, rid in (await session.execute(q)).all():
                    if tid in setup:
                        continue
                    row = out.setdefault(account, {"spent": 0, "ids": set(), "rids": [], "rows": 0})
                    row["spent"] += -(changed + held)
                    row["ids"].add(tid)
                    row["rows"] += 1
                    if rid:
                        row["rids"].append(rid)
    finally:
        await db.close()
    return out


def _reconcile(env: dict[str, str], timeout_s: float) -> tuple[bool, str]:
    """`tokenmeter reconcile` until it is clean (the flusher drained) or the time is up."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        p = subprocess.run([sys.executable, "-m", "api.cli", "reconcile"], env=env, capture_output=True, text=True,
                           timeout=120)
        lines = [ln for ln in (p.stdout + p.stderr).strip().splitlines() if "WARNING" not in ln]
        last = lines[-1] if lines else f"exit {p.returncode}"
        if p.returncode == 0:
            return True, last
        time.sleep(1)
    return False, last


def check_books(base: str, books: dict[str, Any], ledger: dict[str, dict[str, Any]] | None, key: str) -> list[str]:
    """Every account: start + credited - charged = its balance now; and the ledger's usage rows
    are the answers' transactions, each once. Returns the problems (none = pass)."""
    problems: list[str] = []
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        for account, start in books["start"].items():
            charged = books["charged"].get(account, 0)
            expected = start + books["credited"].get(account, 0) - charged
            now = int(client.get(f"/api/v1/meter/accounts/{account}/balance").json()["remaining_tokens"])
            if now != expected:
                problems.append(f"{account}: balance {now}, the answers say {expected} "
                                f"(start {start}, charged {charged})")
            if ledger is None:
                continue
            row = ledger.get(account, {"spent": 0, "ids": set(), "rids": [], "rows": 0})
            answered = set(books["transactions"].get(account, []))
            if row["spent"] != charged or row["ids"] != answered:
                problems.append(f"{account}: ledger usage {row['spent']} in {row['rows']} rows, the answers "
                                f"{charged} in {len(answered)}")
            if len(row["rids"]) != len(set(row["rids"])):
                problems.append(f"{account}: a request id charged twice in the ledger")
    return problems


def parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenmeter loadtest", description=__doc__.split("\n\n")[0],
                                add_help=add_help)
    p.add_argument("--url", help="an already running service (then --master-key; the ledger is checked only "
                                 "with --database-url)")
    p.add_argument("--master-key", help="with --url: a key with the meter and admin scopes")
    p.add_argument("--redis-url", help="the service's Redis (default: embedded)")
    p.add_argument("--database-url", help="the service's database (default: SQLite in --out)")
    p.add_argument("--users", type=int, default=40)
    p.add_argument("--spawn-rate", type=float, default=20)
    p.add_argument("--run-time", type=int, default=30, help="seconds of load")
    p.add_argument("--accounts", type=int, default=500, help="gateway accounts")
    p.add_argument("--out", help="folder for the CSVs, the HTML report and the books (default: a temp folder)")
    p.add_argument("--drain-timeout", type=float, default=120)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.users < 1 or args.run_time < 1 or args.accounts < 1:
        p.error("--users, --run-time and --accounts must be positive")
    out = Path(args.out or tempfile.mkdtemp(prefix="tokenmeter-loadtest-"))
    out.mkdir(parents=True, exist_ok=True)
    key = args.master_key or "lt-" + secrets.token_urlsafe(24)
    pay_secret = secrets.token_hex(16)
    proc = None
    env = _service_env(args, out, key, pay_secret)
    if args.url:
        base, pay_secret = args.url.rstrip("/"), ""
        if not args.master_key:
            p.error("--url needs --master-key")
    else:
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        log = (out / "service.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "api.cli", "serve", "--port", str(port)], env=env,
                                stdout=log, stderr=log, cwd=out, start_new_session=True)
    try:
        _wait_healthy(base, proc)
        rc = _run_locust(args, base, out, key, pay_secret)
        books_path = out / "books.json"
        if not books_path.exists():
            print(f"loadtest: FAIL: locust exited {rc} without writing the books")
            return 1
        books = json.loads(books_path.read_text())
        clean, last = (True, "not checked (--url without --database-url)")
        ledger = None
        if not args.url or args.database_url:
            clean, last = _reconcile(env, args.drain_timeout)
            setup = {t for ids in books["setup"].values() for t in ids}
            ledger = asyncio.run(_ledger(env["TOKENMETER_DATABASE_URL"], list(books["start"]), setup))
        problems = check_books(base, books, ledger, key)
        if not clean:
            problems.append(f"reconcile not clean after {args.drain_timeout:.0f} s: {last}")
        answers = books["answers"]
        total_charged = sum(books["charged"].values())
        print(f"loadtest: {len(books['start'])} accounts, answers {dict(sorted(answers.items()))}, "
              f"{sum(len(v) for v in books['transactions'].values())} charges = {total_charged:,} tokens, "
              f"{books['retries']} retries with the same key, {books['resent']} cut-off calls sent again, "
              f"reconcile: {last}")
        print(f"loadtest: report {out / 'report.html'}, stats {out / 'locust_stats.csv'}")
        if problems:
            print(f"loadtest: FAIL ({len(problems)} problems)")
            for line in problems[:20]:
                print("  " + line)
            return 1
        print("loadtest: PASS: charged per the answers = balance decrease = ledger usage rows; "
              "no transaction twice; reconcile clean")
        return 0
    finally:
        if proc is not None:
            import signal

            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
