"""The Redis store: one EVALSHA per decision, concurrent calls coalesced into one pipeline.

Calls made in the same event-loop tick are written to one connection as a single pipelined
batch and their replies read back in order (auto-batching): far fewer round trips and
syscalls than one call per await. NOSCRIPT (a restarted or flushed Redis) loads the script
and retries once; a NOSCRIPT reply means the script did not run, so the retry is safe.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis import exceptions as rexc
from redis.asyncio import Redis

from meter._errors import MeterError, StoreUnavailable
from meter._scripts import Script, ScriptRegistry

__all__ = ["RedisStore"]

_Pending = tuple[Script, Sequence[str], Sequence[str | int], "asyncio.Future[list[Any]]"]
_UNAVAILABLE = (rexc.ConnectionError, rexc.TimeoutError, OSError, asyncio.TimeoutError)


class RedisStore:
    """Runs wallet scripts on a Redis connection pool, batching concurrent calls."""

    def __init__(self, redis: Redis, registry: ScriptRegistry | None = None, *,
                 max_batch: int = 512) -> None:
        self.redis = redis
        self.registry = registry or ScriptRegistry()
        self.max_batch = max_batch
        self._pending: list[_Pending] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.redis.aclose()

    def call(self, op: str, keys: Sequence[str], argv: Sequence[str | int]) -> asyncio.Future[list[Any]]:
        """Queue one script call for this tick's batch; await the returned future for its reply."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[Any]] = loop.create_future()
        self._pending.append((self.registry[op], keys, argv, fut))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), self.max_batch):
            task = asyncio.ensure_future(self._send(pending[start:start + self.max_batch]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[_Pending]) -> None:
        try:
            replies = await self._pipeline([(s.sha, keys, argv) for s, keys, argv, _ in batch])
            retry = [i for i, r in enumerate(replies) if isinstance(r, rexc.NoScriptError)]
            if retry:
                for script in {batch[i][0] for i in retry}:
                    await self.redis.script_load(script.text)
                again = await self._pipeline([(batch[i][0].sha, batch[i][1], batch[i][2]) for i in retry])
                for i, reply in zip(retry, again, strict=True):
                    replies[i] = reply
        except _UNAVAILABLE as exc:
            err = StoreUnavailable(f"Redis unavailable: {exc}")
            for *_, fut in batch:
                if not fut.done():
                    fut.set_exception(err)
            return
        except BaseException as exc:  # never leave a caller waiting
            for *_, fut in batch:
                if not fut.done():
                    fut.set_exception(MeterError(f"store failure: {exc!r}"))
            raise
        for (script, *_, fut), reply in zip(batch, replies, strict=True):
            if fut.done():
                continue
            if isinstance(reply, Exception):
                fut.set_exception(MeterError(f"script {script.name} failed: {reply}"))
            else:
                fut.set_result(reply)

    async def _pipeline(self, calls: list[tuple[str, Sequence[str], Sequence[str | int]]]) -> list[Any]:
        """Send EVALSHA calls in one write and read every reply; error replies come back as values."""
        pool = self.redis.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            commands = [("EVALSHA", sha, len(keys), *keys, *argv) for sha, keys, argv in calls]
            await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
            replies: list[Any] = []
            for _ in calls:
                try:
                    replies.append(await conn.read_response())
                except rexc.ResponseError as exc:
                    replies.append(exc)
            return replies
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)
