"""A 503 must say whether the debit may have been charged.

A TCP proxy in front of the real Redis forwards every command, then either swallows Redis's
replies (the client times out) or cuts the client's connection as soon as Redis has answered:
in both cases the debit WAS applied, and the caller gets OutcomeUnknown / 503 `outcome_unknown`;
the retry with the same request id is replayed, not charged twice. A refused connection (nothing
sent) is StoreUnavailable / 503 `store_unavailable`. Over the hot-path store (pipelined), the
redis-py store and HTTP."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
from redis.asyncio import Redis

from api.middleware import TokenMeterMiddleware
from meter import Meter, OutcomeUnknown, StoreUnavailable
from meter._redis_store import RedisStore
from tests.api.conftest import make_settings, running_app
from tests.conftest import REDIS_URL

pytestmark = [pytest.mark.redis, pytest.mark.usefixtures("real_redis")]

PROXY_TIMEOUT_MS = 1000  # generous: in "pass" mode a busy machine must not time out


class RedisProxy:
    """Loopback TCP proxy to Redis. mode: "pass" (forward both ways), "swallow" (forward commands,
    drop replies), "cut" (forward commands; when Redis answers, abort the client's connection)."""

    def __init__(self) -> None:
        target = urlparse(REDIS_URL)
        self.target = (target.hostname or "127.0.0.1", target.port or 6379)
        self.mode = "pass"
        self.dropped = 0  # replies swallowed or cut
        self.clients: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
        self.clients.append(writer)
        up_r, up_w = await asyncio.open_connection(*self.target)

        async def commands() -> None:
            try:
                while data := await reader.read(65536):
                    up_w.write(data)
                    await up_w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                up_w.close()

        async def replies() -> None:
            try:
                while data := await up_r.read(65536):
                    if self.mode == "pass":
                        writer.write(data)
                        await writer.drain()
                    elif self.mode == "swallow":
                        self.dropped += 1
                    else:  # cut: Redis has run the command; the client never hears it
                        self.dropped += 1
                        writer.transport.abort()
                        return
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()
                up_w.close()

        await asyncio.gather(commands(), replies())

    def refuse(self) -> None:
        """Stop listening (new connections are refused) and drop every open connection."""
        self.server.close()
        for w in self.clients:
            w.transport.abort()
        self.clients.clear()

    async def stop(self) -> None:
        self.refuse()  # every pipe ends on the aborted connections; wait for them (bounded)
        pending = {t for t in self.tasks if not t.done()}
        if pending:
            await asyncio.wait(pending, timeout=5)
        await self.server.wait_closed()


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def proxy() -> AsyncIterator[tuple[RedisProxy, str]]:
    p = RedisProxy()
    url = await p.start()
    try:
        yield p, url
    finally:
        await p.stop()


async def connect(kind: str, url: str, prefix: str) -> Meter:
    if kind == "pipelined":
        return await Meter.connect(url, prefix=prefix, timeout_ms=PROXY_TIMEOUT_MS, connect_timeout_ms=2000)
    client = Redis.from_url(url, decode_responses=True, socket_timeout=PROXY_TIMEOUT_MS / 1000,
                            socket_connect_timeout=2.0)
    return Meter(RedisStore(client), prefix=prefix)


@pytest.fixture
async def direct() -> AsyncIterator[Callable[[str], Awaitable[Meter]]]:
    """A Meter straight on Redis (no proxy) for the checks; the prefix's keys are deleted afterwards."""
    made: list[tuple[Meter, str]] = []

    async def make(prefix: str) -> Meter:
        m = await Meter.connect(REDIS_URL, prefix=prefix, timeout_ms=5000, connect_timeout_ms=5000)
        made.append((m, prefix))
        return m

    yield make
    for m, prefix in made:
        r = m.store.redis  # type: ignore[attr-defined]
        keys = [k async for k in r.scan_iter(match=f"{prefix}:*")]
        if keys:
            await r.delete(*keys)
        await m.close()


@pytest.mark.parametrize("kind", ["pipelined", "redis-py"])
@pytest.mark.parametrize("mode", ["swallow", "cut"])
async def test_sent_then_lost_is_outcome_unknown_and_the_retry_is_replayed(
        kind: str, mode: str, proxy: tuple[RedisProxy, str], direct: Callable[[str], Awaitable[Meter]]) -> None:
    p, url = proxy
    prefix = f"tmou{uuid.uuid4().hex[:8]}"
    check = await direct(prefix)
    await check.open_account("u1")
    meter = await connect(kind, url, prefix)
    try:
        assert (await meter.debit("u1", 5, request_id="warm")).allowed  # scripts loaded, connection open
        start = (await check.balance("u1")).remaining_tokens
        p.mode = mode
        with pytest.raises(OutcomeUnknown):
            await meter.debit("u1", 10, request_id="r-1")
        assert p.dropped >= 1
        # it did reach Redis and was charged: "store unavailable" would have been a lie
        assert (await check.balance("u1")).remaining_tokens == start - 10
        p.mode = "pass"
        again = await meter.debit("u1", 10, request_id="r-1")
        assert again.replayed and again.allowed
        assert (await check.balance("u1")).remaining_tokens == start - 10  # charged once
    finally:
        await meter.close()


@pytest.mark.parametrize("kind", ["pipelined", "redis-py"])
async def test_connection_refused_is_store_unavailable(kind: str, proxy: tuple[RedisProxy, str],
                                                       direct: Callable[[str], Awaitable[Meter]]) -> None:
    p, url = proxy
    prefix = f"tmou{uuid.uuid4().hex[:8]}"
    check = await direct(prefix)
    await check.open_account("u1")
    meter = await connect(kind, url, prefix)
    try:
        assert (await meter.debit("u1", 5, request_id="warm")).allowed
        start = (await check.balance("u1")).remaining_tokens
        p.refuse()  # the open connection is dropped, new ones are refused: nothing can be sent
        await asyncio.sleep(0.05)
        errors = []
        for i in range(3):
            with pytest.raises(StoreUnavailable) as err:
                await meter.debit("u1", 10, request_id=f"r-{i}")
            errors.append(err.value)
        # redis-py hands out its idle pooled connection unchecked: the first command is written into
        # a socket the peer has closed, and the client cannot know it went nowhere, so it says
        # OutcomeUnknown (conservative). Every call that finds no connection is StoreUnavailable.
        known = errors if kind == "pipelined" else errors[1:]
        assert not any(isinstance(e, OutcomeUnknown) for e in known), errors
        assert (await check.balance("u1")).remaining_tokens == start
    finally:
        await meter.close()
    dead = await connect(kind, f"redis://127.0.0.1:{free_port()}/0", prefix)
    try:
        with pytest.raises(StoreUnavailable) as err:
            await dead.debit("u1", 1)
        assert not isinstance(err.value, OutcomeUnknown)
    finally:
        await dead.close()


async def test_over_http(tmp_path: Any, proxy: tuple[RedisProxy, str]) -> None:
    p, url = proxy
    # flusher external: no long-blocking stream reads through the proxy while it swallows replies
    settings = make_settings(tmp_path, redis_url=url, flusher="external", redis_timeout_ms=PROXY_TIMEOUT_MS)
    async with running_app(settings) as api:
        h = api.service()
        acct = f"ou-{uuid.uuid4().hex[:6]}"
        assert (await api.client.post("/api/v1/meter/accounts", json={"account_id": acct},
                                      headers=h)).status_code == 201

        async def remaining() -> int:
            r = await api.client.get(f"/api/v1/meter/accounts/{acct}/balance", headers=h)
            return int(r.json()["remaining_tokens"])

        start = await remaining()
        for mode, key in (("swallow", "k-1"), ("cut", "k-2")):
            p.mode = mode
            r = await api.client.post("/api/v1/meter/debit", json={"account_id": acct, "tokens": 10},
                                      headers={**h, "Idempotency-Key": key})
            assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
            assert r.json()["error"] == "outcome_unknown" and "Idempotency-Key" in r.json()["message"]
            p.mode = "pass"
            r = await api.client.post("/api/v1/meter/debit", json={"account_id": acct, "tokens": 10},
                                      headers={**h, "Idempotency-Key": key})
            assert r.status_code == 200 and r.json()["replayed"] is True, r.text
        assert await remaining() == start - 20  # each debit charged exactly once
        p.refuse()
        await asyncio.sleep(0.05)  # the hot connection hears the close before the next debit
        r = await api.client.post("/api/v1/meter/debit", json={"account_id": acct, "tokens": 10},
                                  headers={**h, "Idempotency-Key": "k-3"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert r.json()["error"] == "store_unavailable"
        # teardown deletes the prefix's keys through the app's Redis client: point it past the proxy
        api.state.rt.redis = Redis.from_url(REDIS_URL, decode_responses=True)


async def test_the_middleware_says_outcome_unknown(proxy: tuple[RedisProxy, str],
                                                   direct: Callable[[str], Awaitable[Meter]]) -> None:
    p, url = proxy
    prefix = f"tmou{uuid.uuid4().hex[:8]}"
    check = await direct(prefix)
    await check.open_account("u1")
    meter = await connect("pipelined", url, prefix)
    ran: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        ran.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    wrapped = TokenMeterMiddleware(app, meter=meter, account=lambda s: "u1", tokens=10)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=wrapped), base_url="http://t") as client:
            assert (await client.get("/warm")).status_code == 200
            start = (await check.balance("u1")).remaining_tokens
            p.mode = "swallow"
            r = await client.get("/x", headers={"Idempotency-Key": "m-1"})
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"] == "outcome_unknown" and ran == ["/warm"]
            p.mode = "pass"
            r = await client.get("/x", headers={"Idempotency-Key": "m-1"})
            assert r.status_code == 200 and ran == ["/warm", "/x"]
            assert (await check.balance("u1")).remaining_tokens == start - 10  # charged once
    finally:
        await meter.close()


@pytest.mark.unit
async def test_the_hot_connection_tells_sent_from_unsent() -> None:
    """Lost after its write: OutcomeUnknown; still in the output buffer (never written): StoreUnavailable."""
    from meter._pipelined_store import _Connection, pack

    class Transport:
        def __init__(self) -> None:
            self.written: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.written.append(data)

        def close(self) -> None: ...

        def abort(self) -> None: ...

    conn = _Connection(timeout=5.0)
    transport = Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    sent = conn.send(pack("PING"))
    await asyncio.sleep(0)  # the flush runs: written
    assert transport.written
    unsent = conn.send(pack("PING"))  # queued for the next flush
    conn.connection_lost(ConnectionResetError("reset"))
    with pytest.raises(OutcomeUnknown):
        await sent
    with pytest.raises(StoreUnavailable) as err:
        await unsent
    assert not isinstance(err.value, OutcomeUnknown)
    with pytest.raises(StoreUnavailable) as err:  # a send on the broken connection sends nothing
        conn.send(pack("PING"))
    assert not isinstance(err.value, OutcomeUnknown)
    await asyncio.sleep(0)
    assert len(transport.written) == 1
