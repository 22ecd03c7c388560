"""The Redis store: one EVALSHA per decision, concurrent calls coalesced into one pipeline.

Calls made in the same event-loop tick are written to one connection as a single pipelined
batch and their replies read back in order (auto-batching): far fewer round trips and
syscalls than one call per await. NOSCRIPT (a restarted or flushed Redis) loads the script
and retries once; a NOSCRIPT reply means the script did not run, so the retry is safe.

An outage before the batch is written (no connection) is StoreUnavailable; once it is written, a
dropped connection or a read timeout is OutcomeUnknown (the scripts may have run). An error reply
Redis gives without running the command (LOADING after a restart, BUSY, MASTERDOWN) is
StoreUnavailable too, not a script failure.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis import exceptions as rexc
from redis.asyncio import Redis

from meter._errors import MeterError, OutcomeUnknown, StoreUnavailable
from meter._pipelined_store import refused_unrun
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
        except BaseException as exc:
            self._fail(batch, exc)
            raise
        if isinstance(replies, StoreUnavailable):
            self._fail(batch, replies)
            return
        retry = [i for i, r in enumerate(replies) if isinstance(r, rexc.NoScriptError)]
        if retry:
            # Only the NOSCRIPT calls are retried; the others already have their replies.
            again_batch = [batch[i] for i in retry]
            try:
                for script in {p[0] for p in again_batch}:
                    await self.redis.script_load(script.text)
            except _UNAVAILABLE as exc:
                again: list[Any] | StoreUnavailable = StoreUnavailable(f"cannot load scripts: {exc}")
            except rexc.ResponseError as exc:  # LOADING, BUSY: not loaded, nothing ran
                again = StoreUnavailable(f"cannot load scripts: {exc}")
            except BaseException as exc:
                self._fail(again_batch, exc)
                raise
            else:
                try:
                    again = await self._pipeline([(s.sha, keys, argv) for s, keys, argv, _ in again_batch])
                except BaseException as exc:
                    self._fail(again_batch, exc)
                    raise
            if isinstance(again, StoreUnavailable):
                self._fail(again_batch, again)
                failed = set(retry)
                batch = [p for i, p in enumerate(batch) if i not in failed]
                replies = [r for i, r in enumerate(replies) if i not in failed]
            else:
                for i, reply in zip(retry, again, strict=True):
                    replies[i] = reply
        for (script, *_, fut), reply in zip(batch, replies, strict=True):
            if fut.done():
                continue
            if isinstance(reply, rexc.BusyLoadingError | rexc.MasterDownError) or (
                    isinstance(reply, Exception) and refused_unrun(str(reply))):
                fut.set_exception(StoreUnavailable(f"Redis refused {script.name} unrun: {reply}"))
            elif isinstance(reply, Exception):
                fut.set_exception(MeterError(f"script {script.name} failed: {reply}"))
            else:
                fut.set_result(reply)

    @staticmethod
    def _fail(batch: list[_Pending], exc: BaseException) -> None:
        """Never leave a caller waiting: an outage as itself, anything else as a MeterError."""
        err = exc if isinstance(exc, StoreUnavailable) else MeterError(f"store failure: {exc!r}")
        for *_, fut in batch:
            if not fut.done():
                fut.set_exception(err)

    async def _pipeline(self, calls: list[tuple[str, Sequence[str], Sequence[str | int]]]
                        ) -> list[Any] | StoreUnavailable:
        """Send EVALSHA calls in one write and read every reply; error replies come back as values,
        and so does an outage (StoreUnavailable before the write, OutcomeUnknown after it)."""
        pool = self.redis.connection_pool
        try:
            conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        except _UNAVAILABLE as exc:  # no connection: nothing was sent
            return StoreUnavailable(f"Redis unavailable: {exc}")
        try:
            commands = [("EVALSHA", sha, len(keys), *keys, *argv) for sha, keys, argv in calls]
            # From the first byte written on, the scripts may run: a failure is OutcomeUnknown.
            await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
            replies: list[Any] = []
            for _ in calls:
                try:
                    # disconnect_on_error=False: a LOADING reply (BusyLoadingError, a ConnectionError
                    # to redis-py) must not drop the connection before the batch's other replies are
                    # read; a real connection failure is handled (and disconnected) below.
                    replies.append(await conn.read_response(disconnect_on_error=False))
                except (rexc.ResponseError, rexc.BusyLoadingError) as exc:
                    replies.append(exc)
            return replies
        except _UNAVAILABLE as exc:
            await conn.disconnect()
            return OutcomeUnknown(f"Redis connection lost after the command was sent: {exc}; it may have "
                                  "been applied, retry with the same request id")
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)
