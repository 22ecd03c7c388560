"""What the CLI's commands share: settings from the command line, a runtime for one command."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import TypeVar

from api.runtime import Runtime
from api.settings import Settings

__all__ = ["_settings", "_with_runtime"]

T = TypeVar("T")


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in (("redis_url", args.redis_url), ("database_url", args.database_url))
                 if v is not None}
    return Settings(**overrides)


async def _with_runtime(args: argparse.Namespace, fn: Callable[[Runtime], Awaitable[T]]) -> T:
    from persistence import migrate

    rt = await Runtime.start(_settings(args))
    try:
        if rt.settings.migrate_on_start:
            await migrate.upgrade(rt.db)
        return await fn(rt)
    finally:
        await rt.close()
