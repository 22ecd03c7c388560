"""The `tokenmeter` command line (service commands arrive with the HTTP and persistence work)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from meter._meter import Meter

__all__ = ["main"]


async def _balance(url: str, account_id: str) -> int:
    meter = await Meter.connect(url)
    try:
        print(json.dumps((await meter.balance(account_id)).as_dict(), indent=2))
    finally:
        await meter.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenmeter", description="Token meter and rate limiter.")
    sub = parser.add_subparsers(dest="command", required=True)
    bal = sub.add_parser("balance", help="print an account's live balance from Redis")
    bal.add_argument("account_id")
    bal.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args(argv)
    if args.command == "balance":
        return asyncio.run(_balance(args.redis_url, args.account_id))
    return 2


if __name__ == "__main__":
    sys.exit(main())
