"""The hot-path Redis store: one pipelined connection, hand-packed EVALSHA, hiredis parsing.

Every call is written into an output buffer that is flushed once per event-loop tick, so
concurrent calls share one write and one read (auto-batching without a pipeline object).
Replies arrive in order and resolve their callers' futures straight from `data_received`.
A watchdog fails every waiting call when Redis has not answered anything for `timeout_ms` while
calls wait: the meter fails closed.

Failures say whether the command left us: OutcomeUnknown when it was written and then the
connection dropped or the reply did not come (the script may well have run), StoreUnavailable
when it was never sent (no connection, or Redis refused it unrun: LOADING, BUSY, MASTERDOWN).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from typing import Any, cast

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import BlockingConnectionPool, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from meter._errors import MeterError, OutcomeUnknown, StoreUnavailable
from meter._scripts import ScriptRegistry

__all__ = ["PipelinedRedisStore", "refused_unrun"]

# Error replies Redis gives before running a command: the script did not run, so it is an outage
# (503 store_unavailable, retry later), not a script failure.
_UNRUN_PREFIXES = ("LOADING", "BUSY", "MASTERDOWN")


def refused_unrun(message: str) -> bool:
    """True for an error reply that means Redis refused the command without running it."""
    return message.startswith(_UNRUN_PREFIXES)


def pack(*args: str | int | bytes) -> bytes:
    """One RESP command, packed by hiredis in C."""
    # cast: hiredis's type stub declares the argument as a one-element tuple; any length works
    packed: bytes = hiredis.pack_command(cast(Any, args))
    return packed


class _Connection(asyncio.Protocol):
    """A RESP connection whose replies resolve waiting futures in FIFO order."""

    def __init__(self, timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.timeout = timeout
        self.reader = hiredis.Reader(encoding="utf-8")
        self.transport: asyncio.Transport | None = None
        self.waiters: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.out: list[bytes] = []
        self.flush_scheduled = False
        self.watchdog: asyncio.TimerHandle | None = None
        self.broken: Exception | None = None
        self.silent_since: float | None = None  # when Redis last owed us a reply and gave none

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiters = self.waiters
        while (reply := self.reader.gets()) is not False:
            fut, _ = waiters.popleft()
            if not fut.done():
                fut.set_result(reply)
        self.silent_since = self.loop.time() if waiters else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"Redis connection lost: {exc or 'closed by server'}")

    # use
    def send(self, payload: bytes) -> asyncio.Future[Any]:
        if self.broken is not None:  # this command is not sent: nothing can have run
            raise StoreUnavailable(str(self.broken))
        fut = self.loop.create_future()
        self.waiters.append((fut, self.loop.time()))
        self.out.append(payload)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)
        if self.watchdog is None:
            self.watchdog = self.loop.call_later(self.timeout, self._check)
        return fut

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self._fail("connection closed")

    def _flush(self) -> None:
        self.flush_scheduled = False
        if self.out and self.transport is not None and self.broken is None:
            self.transport.write(b"".join(self.out))
            if self.silent_since is None:
                self.silent_since = self.loop.time()
        self.out.clear()

    def _check(self) -> None:
        self.watchdog = None
        if not self.waiters:
            return
        # Silence is measured from the last reply (or the first write since): a long pipeline
        # that keeps answering is not a failure, a Redis that answers nothing is.
        oldest = self.silent_since if self.silent_since is not None else self.loop.time()
        if self.loop.time() - oldest >= self.timeout:
            if self.transport is not None:
                self.transport.abort()
            self._fail(f"Redis did not answer within {self.timeout * 1000:.0f} ms")
        else:
            self.watchdog = self.loop.call_at(oldest + self.timeout, self._check)

    def _fail(self, reason: str) -> None:
        # The last len(self.out) waiters were never written (their flush had not run yet): they
        # are StoreUnavailable; every earlier one was sent and may have run: OutcomeUnknown.
        unsent = StoreUnavailable(f"{reason} (the command was not sent)")
        sent = OutcomeUnknown(f"{reason} after the command was sent: it may have been applied; "
                              "retry with the same request id")
        if self.broken is None:
            self.broken = unsent
        n_sent = len(self.waiters) - len(self.out)
        self.out.clear()
        while self.waiters:
            fut, _ = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(sent if n_sent > 0 else unsent)
            n_sent -= 1
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None


class PipelinedRedisStore:
    """Runs wallet scripts over one auto-pipelined connection; reconnects lazily after a failure.

    `redis` is an ordinary redis-py client on the same server for everything off the hot path.
    """

    def __init__(self, url: str, registry: ScriptRegistry | None = None, *, timeout_ms: int = 100,
                 connect_timeout_ms: int = 100, side_timeout_ms: int = 10_000,
                 max_connections: int = 16) -> None:
        self.url = url
        self.registry = registry or ScriptRegistry()
        self.timeout = timeout_ms / 1000
        self.connect_timeout = connect_timeout_ms / 1000
        self.options = parse_url(url)
        # Off the hot path (flusher, tools, script loading): long reads and blocking commands.
        # A blocking pool: callers beyond max_connections wait for a free connection instead of failing.
        pool = BlockingConnectionPool.from_url(url, decode_responses=True, socket_timeout=side_timeout_ms / 1000,
                                               socket_connect_timeout=2.0,
                                               max_connections=max_connections, timeout=side_timeout_ms / 1000)
        self.redis = Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))
        self._conn: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None
        self._loading: dict[str, asyncio.Future[Any]] = {}

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        await self.redis.aclose()

    async def call(self, op: str, keys: Sequence[str], argv: Sequence[str | int]) -> list[Any]:
        payload = self._pack(op, keys, argv)
        conn = self._conn
        if conn is None or conn.broken is not None:
            conn = await self._connect()
        reply = await conn.send(payload)
        if isinstance(reply, hiredis.ReplyError):
            if refused_unrun(str(reply)):
                raise StoreUnavailable(f"Redis refused {op} unrun: {reply}")
            if not str(reply).startswith("NOSCRIPT"):
                raise MeterError(f"script {op} failed: {reply}")
            await self._load_script(op)
            reply = await conn.send(payload)
            if isinstance(reply, hiredis.ReplyError):
                if refused_unrun(str(reply)):
                    raise StoreUnavailable(f"Redis refused {op} unrun: {reply}")
                raise MeterError(f"script {op} failed after loading: {reply}")
        result: list[Any] = reply
        return result

    async def _load_script(self, op: str) -> None:
        """SCRIPT LOAD once for all the calls that met NOSCRIPT at the same time."""
        loading = self._loading.get(op)
        if loading is None:
            loading = asyncio.ensure_future(self._script_load(op))
            self._loading[op] = loading
            loading.add_done_callback(lambda _: self._loading.pop(op, None))
        try:
            await asyncio.shield(loading)
        except Exception as exc:
            raise StoreUnavailable(f"cannot load script {op}: {exc}") from exc

    async def _script_load(self, op: str) -> str:
        """SCRIPT LOAD, tried twice: NOSCRIPT usually means Redis restarted, and then the side
        pool's first connection is a stale one from before (loading a script is idempotent)."""
        try:
            sha: str = await self.redis.script_load(self.registry[op].text)
        except RedisConnectionError:
            sha = await self.redis.script_load(self.registry[op].text)
        return sha

    def _pack(self, op: str, keys: Sequence[str], argv: Sequence[str | int]) -> bytes:
        return pack("EVALSHA", self.registry[op].sha, len(keys), *keys, *argv)

    async def _connect(self) -> _Connection:
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        try:
            return await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        o = self.options
        try:
            factory = lambda: _Connection(self.timeout)  # noqa: E731
            if "path" in o:
                coro = loop.create_unix_connection(factory, o["path"])
            else:
                coro = loop.create_connection(factory, o.get("host", "localhost"), o.get("port", 6379))
            _, conn = await asyncio.wait_for(coro, self.connect_timeout)
        except (TimeoutError, OSError) as exc:
            raise StoreUnavailable(f"cannot connect to Redis: {exc or 'timed out'}") from exc
        setup = []
        if o.get("password"):
            auth = ("AUTH", o["username"], o["password"]) if o.get("username") else ("AUTH", o["password"])
            setup.append(conn.send(pack(*auth)))
        if o.get("db"):
            setup.append(conn.send(pack("SELECT", o["db"])))
        try:
            replies = await asyncio.gather(*setup)
        except StoreUnavailable as exc:  # lost during AUTH/SELECT: none of our scripts was sent
            raise StoreUnavailable(f"cannot set up the Redis connection: {exc}") from exc
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                conn.close()
                raise StoreUnavailable(f"Redis refused the connection setup: {reply}")
        self._conn = conn
        return conn
