"""The `tokenmeter` command line. Settings come from the environment (see api/settings.py);
--redis-url and --database-url override REDIS_URL and DATABASE_URL."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys

from api.cli_admin import cmd_admin, cmd_apikey
from api.cli_common import _settings, _with_runtime
from api.redact import mask_url
from api.runtime import Runtime
from persistence.flusher import tune_gc

__all__ = ["main"]


async def cmd_migrate(args: argparse.Namespace) -> int:
    from persistence import migrate
    from persistence.db import Database

    db = Database(_settings(args).database_url)
    try:
        if args.downgrade:
            await migrate.downgrade(db, args.downgrade)
        else:
            await migrate.upgrade(db, args.revision)
        print(f"database at revision {await migrate.current_revision(db)}")
    finally:
        await db.close()
    return 0


async def _migrate_when_reachable(rt: Runtime, stop: asyncio.Event) -> None:
    """Upgrade the schema, waiting out a database that is down or starting (capped backoff)."""
    from persistence import migrate
    from persistence.db import DatabaseMisconfigured, is_configuration_error, is_transient

    delay = 0.5
    while not stop.is_set():
        try:
            await migrate.upgrade(rt.db)
            return
        except Exception as exc:
            if is_configuration_error(exc):
                raise DatabaseMisconfigured(str(exc)) from exc
            if not is_transient(exc):
                raise
            logging.getLogger("tokenmeter.flusher").warning(
                "database not reachable yet, retrying the migration in %.1fs: %s", delay, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 10.0)


async def cmd_flusher(args: argparse.Namespace) -> int:
    from persistence.db import DatabaseMisconfigured

    settings = _settings(args)
    if settings.embedded_redis:
        print("tokenmeter flusher needs a real Redis: set REDIS_URL (the embedded Redis lives "
              "inside the service process, whose in-process flusher drains it)", file=sys.stderr)
        return 2
    rt = await Runtime.start(settings)
    try:
        flusher = rt.flusher(consumer=args.consumer or "")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        port = settings.flusher_metrics_port if args.metrics_port is None else args.metrics_port
        if port:
            from prometheus_client import start_http_server

            host = args.metrics_host or settings.flusher_metrics_host
            start_http_server(port, addr=host)  # a daemon thread: /metrics of this process
            print(f"flusher metrics: http://{host}:{port}/metrics", flush=True)
        tune_gc()  # this process only flushes: see persistence.flusher.tune_gc
        print(f"flusher {flusher.config.consumer}: {len(flusher.streams)} streams -> {rt.db.dialect}",
              flush=True)
        try:
            if settings.migrate_on_start:
                await _migrate_when_reachable(rt, stop)
            await flusher.run(stop)
        except DatabaseMisconfigured as exc:
            print(f"tokenmeter flusher: the database refuses the connection for good (check DATABASE_URL, "
                  f"the credentials and that the database exists): {exc}", file=sys.stderr)
            return 2
        return 0
    finally:
        await rt.close()


async def cmd_rehydrate(args: argparse.Namespace) -> int:
    from persistence.rehydrate import rehydrate_all

    async def run(rt: Runtime) -> int:
        n = await rehydrate_all(rt.meter, rt.db)
        print(f"rehydrated {n} accounts")
        return 0

    return int(await _with_runtime(args, run))


async def cmd_reconcile(args: argparse.Namespace) -> int:
    from persistence.flusher import FlusherConfig
    from persistence.reconcile import format_backlog, format_report, reconcile, repair, stale_backlog

    async def run(rt: Runtime) -> int:
        s = rt.settings
        checks = await reconcile(rt.redis, rt.db, shards=s.shards, prefix=s.key_prefix)
        print(format_report(checks, show_all=args.all))
        if args.repair:
            for line in await repair(rt.meter, checks, apply=args.apply):
                print(line)
            if args.apply:  # say where things stand now
                checks = await reconcile(rt.redis, rt.db, shards=s.shards, prefix=s.key_prefix)
                print(format_report(checks, show_all=args.all))
        stale_after = s.reconcile_stale_after_s if args.stale_after is None else args.stale_after
        stuck = await stale_backlog(rt.redis, group=FlusherConfig().group, older_than_s=stale_after,
                              shards=s.shards, prefix=s.key_prefix)
        if stuck:
            print(format_backlog(stuck, stale_after))
        return 0 if all(c.ok for c in checks) and not stuck else 1

    return int(await _with_runtime(args, run))


async def cmd_balance(args: argparse.Namespace) -> int:
    async def run(rt: Runtime) -> int:
        print(json.dumps((await rt.meter.balance(args.account_id)).as_dict(), indent=2))
        return 0

    return int(await _with_runtime(args, run))


def cmd_serve(args: argparse.Namespace) -> int:
    import os
    import secrets
    import shutil

    import uvicorn

    settings = _settings(args)
    for name, value in (("REDIS_URL", args.redis_url), ("DATABASE_URL", args.database_url)):
        if value is not None:
            os.environ[name] = value
    if args.workers > 1 and settings.embedded_redis:
        print("--workers > 1 needs a real Redis shared by the workers: set REDIS_URL "
              "(the embedded Redis lives inside one process)", file=sys.stderr)
        return 2
    if not settings.master_key:
        os.environ["TOKENMETER_MASTER_KEY"] = secrets.token_urlsafe(24)
        key_note = (f"dev master key (this run only; set TOKENMETER_MASTER_KEY to fix one): "
                    f"{os.environ['TOKENMETER_MASTER_KEY']}")
    else:
        key_note = "master key: from TOKENMETER_MASTER_KEY"
    if not settings.jwt_secret:  # one secret for every worker; user tokens end with this run
        os.environ["TOKENMETER_JWT_SECRET"] = secrets.token_urlsafe(32)
        key_note += "\n  user tokens: signed with a per-run secret (set TOKENMETER_JWT_SECRET to keep them valid)"
    if settings.payment_provider == "test" and not settings.test_payment_secret:  # shared by the workers
        os.environ["TOKENMETER_TEST_PAYMENT_SECRET"] = secrets.token_hex(32)
        key_note += (f"\n  test payments: completions signed with {os.environ['TOKENMETER_TEST_PAYMENT_SECRET']} "
                     "(this run only; set TOKENMETER_TEST_PAYMENT_SECRET to fix one)")
    redis = mask_url(settings.redis_url) if settings.redis_url else \
        "embedded in-process Redis (fakeredis with Lua; data lives in this process)"
    print(f"tokenmeter listening on http://{args.host}:{args.port}  (dashboard: http://{args.host}:{args.port}/, "
          f"API docs: http://{args.host}:{args.port}/docs)")
    print(f"  redis:    {redis}")
    print(f"  database: {mask_url(settings.database_url)}")
    print(f"  flusher:  {settings.flusher}")
    print(f"  {key_note}")
    # `tokenmeter` is on PATH in an installed image; from a checkout it lives in .venv/bin
    cli = "tokenmeter" if shutil.which("tokenmeter") else "python3 dev.py tokenmeter"
    print(f"  service keys: {cli} apikey create --name my-gateway --scopes meter  "
          "(or POST /api/v1/admin/api-keys with the master key)", flush=True)
    uvicorn.run("api.app:create_app", factory=True, host=args.host, port=args.port, workers=args.workers,
                loop="uvloop", http="httptools", log_level="warning" if not args.verbose else "info")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenmeter", description="Token meter and rate limiter.")
    p.add_argument("--redis-url", help="overrides REDIS_URL")
    p.add_argument("--database-url", help="overrides DATABASE_URL")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("migrate", help="upgrade the database schema (Alembic) to head")
    m.add_argument("--revision", default="head")
    m.add_argument("--downgrade", metavar="REV", help="downgrade to REV instead (e.g. base)")
    m.set_defaults(fn=cmd_migrate)
    f = sub.add_parser("flusher", help="move journal entries from Redis into the database until stopped")
    f.add_argument("--consumer", help="consumer name, the same on every restart (default: "
                                      "TOKENMETER_FLUSHER_CONSUMER, else the host name)")
    f.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics on this port (default: TOKENMETER_FLUSHER_METRICS_PORT; 0 = off)")
    f.add_argument("--metrics-host", default=None, help="address of the metrics port (default 127.0.0.1)")
    f.set_defaults(fn=cmd_flusher)
    r = sub.add_parser("rehydrate", help="load every account missing from Redis from the database")
    r.set_defaults(fn=cmd_rehydrate)
    c = sub.add_parser("reconcile", help="compare Redis balances with the ledger; exit 1 on drift")
    c.add_argument("--all", action="store_true", help="list every account, not only drifting ones")
    c.add_argument("--repair", action="store_true",
                   help="load the ledger's state into Redis for accounts Redis lacks or lost entries of "
                        "(a dry run unless --apply)")
    c.add_argument("--apply", action="store_true", help="with --repair: write")
    c.add_argument("--stale-after", type=float, metavar="S",
                   help="warn (exit 1) on journal entries older than S seconds not yet in the ledger "
                        "(default TOKENMETER_RECONCILE_STALE_AFTER_S)")
    c.set_defaults(fn=cmd_reconcile)
    s = sub.add_parser("serve", help="run the HTTP service (embedded Redis and SQLite unless configured)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--workers", type=int, default=1)
    s.set_defaults(fn=cmd_serve, sync=True)
    k = sub.add_parser("apikey", help="create or revoke a service API key")
    ksub = k.add_subparsers(dest="action", required=True)
    kc = ksub.add_parser("create")
    kc.add_argument("--name", required=True)
    kc.add_argument("--scopes", default="meter", help="comma-separated: meter, admin")
    kr = ksub.add_parser("revoke")
    kr.add_argument("key_id")
    k.set_defaults(fn=cmd_apikey)
    ad = sub.add_parser("admin", help="grant, adjust, refund, set plans, manage promo codes, list accounts")
    asub = ad.add_subparsers(dest="action", required=True)
    for name, help_, buckets in (("grant", "credit tokens", ("bonus", "premium")),
                                 ("adjust", "take tokens back (never below zero)", ("bonus", "premium", "any")),
                                 ("refund", "give tokens back (bonus bucket)", None)):
        x = asub.add_parser(name, help=help_)
        x.add_argument("account_id")
        x.add_argument("tokens", type=int)
        if buckets:
            x.add_argument("--bucket", choices=buckets, default=buckets[0])
        x.add_argument("--reason", required=True)
    sp = asub.add_parser("set-plan", help="upgrade now / downgrade at the next period")
    sp.add_argument("account_id")
    sp.add_argument("plan")
    sp.add_argument("--reason", required=True)
    pc = asub.add_parser("promo-create", help="create a promo code")
    pc.add_argument("code")
    pc.add_argument("bonus_tokens", type=int)
    pc.add_argument("--max", type=int, default=None, help="global redemption cap")
    pc.add_argument("--plan", default=None, help="only accounts on this plan")
    pd = asub.add_parser("promo-disable", help="disable a promo code")
    pd.add_argument("code")
    al = asub.add_parser("accounts", help="list or search accounts")
    al.add_argument("query", nargs="?")
    al.add_argument("--limit", type=int, default=50)
    ad.set_defaults(fn=cmd_admin)
    from loadtests.loadtest import parser as loadtest_parser

    sub.add_parser("loadtest", help="Locust load test that checks the books (tokenmeter loadtest --help)",
                   parents=[loadtest_parser(add_help=False)], add_help=False)
    from loadtests.bench import parser as bench_parser

    sub.add_parser("bench", help="the hot path's benchmarks side by side, with their ratios (tokenmeter bench --help)",
                   parents=[bench_parser(add_help=False)], add_help=False)
    b = sub.add_parser("balance", help="print an account's live balance")
    b.add_argument("account_id")
    b.set_defaults(fn=cmd_balance)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["loadtest"]:  # its own options (loadtests/loadtest.py); Locust runs in a subprocess
        from loadtests.loadtest import main as loadtest

        return loadtest(argv[1:])
    if argv[:1] == ["bench"]:  # its own options and sections (loadtests/bench.py)
        from loadtests.bench import main as bench

        return bench(argv[1:])
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(args, "sync", False):
        return int(args.fn(args))
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return int(asyncio.run(args.fn(args)))


if __name__ == "__main__":
    sys.exit(main())
