"""A Redis that is still loading its dataset after a restart answers every command with
`-LOADING ...`: the script did not run, so it is an outage to wait out (StoreUnavailable, 503
`store_unavailable` with Retry-After), not a script failure (it was 503 `meter_error`).

The server here is a fake on a loopback socket that speaks just enough RESP: +OK to the connection
set-up commands a loading Redis accepts (CLIENT, AUTH, SELECT, HELLO-less RESP2), -LOADING to all
else. Deterministic, unlike racing a real redis-server through a large AOF."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import hiredis
import pytest
from redis.asyncio import Redis

from meter import Meter, OutcomeUnknown, StoreUnavailable
from meter._redis_store import RedisStore
from tests.api.conftest import make_settings, running_app
from tests.conftest import REDIS_URL

LOADING = b"-LOADING Redis is loading the dataset in memory\r\n"
ACCEPTED_WHILE_LOADING = {b"CLIENT", b"AUTH", b"SELECT"}


class LoadingRedis:
    """Answers every command but the connection set-up ones with LOADING; counts what it got."""

    def __init__(self) -> None:
        self.commands: list[bytes] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = hiredis.Reader()
        try:
            while data := await reader.read(65536):
                parser.feed(data)
                while (command := parser.gets()) is not False:
                    name = bytes(command[0]).upper()
                    self.commands.append(name)
                    writer.write(b"+OK\r\n" if name in ACCEPTED_WHILE_LOADING else LOADING)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def loading_url() -> AsyncIterator[tuple[LoadingRedis, str]]:
    fake = LoadingRedis()
    url = await fake.start()
    try:
        yield fake, url
    finally:
        await fake.stop()


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["pipelined", "redis-py"])
async def test_a_loading_redis_is_store_unavailable(kind: str, loading_url: tuple[LoadingRedis, str]) -> None:
    fake, url = loading_url
    if kind == "pipelined":
        meter = await Meter.connect(url, timeout_ms=2000, connect_timeout_ms=2000)
    else:
        meter = Meter(RedisStore(Redis.from_url(url, decode_responses=True, socket_timeout=2.0, protocol=2)))
    try:
        for call in (lambda: meter.debit("u1", 5, request_id="r-1"), lambda: meter.open_account("u1"),
                     lambda: meter.balance("u1")):
            with pytest.raises(StoreUnavailable) as err:
                await call()
            assert not isinstance(err.value, OutcomeUnknown)  # refused unrun: nothing was charged
            assert "LOADING" in str(err.value) or "loading" in str(err.value)
    finally:
        await meter.close()
    assert b"EVALSHA" in fake.commands  # the script call itself met LOADING (not only the set-up)


@pytest.mark.redis
async def test_over_http_503_store_unavailable_with_retry_after(tmp_path: Any,
                                                                loading_url: tuple[LoadingRedis, str]) -> None:
    fake, url = loading_url
    settings = make_settings(tmp_path, redis_url=url, flusher="external")
    async with running_app(settings) as api:
        try:
            for path, body in (("/api/v1/meter/debit", {"account_id": "u1", "tokens": 5}),
                               ("/api/v1/meter/reserve", {"account_id": "u1", "tokens": 5}),
                               ("/api/v1/meter/accounts", {"account_id": "u1"})):
                r = await api.client.post(path, json=body, headers={**api.service(), "Idempotency-Key": "k"})
                assert r.status_code == 503, r.text
                assert r.headers["retry-after"] == "1"
                assert r.json()["error"] == "store_unavailable", r.text
            assert b"EVALSHA" in fake.commands
        finally:
            # teardown scans the prefix's keys through the app's Redis client: not through the fake
            api.state.rt.redis = Redis.from_url(REDIS_URL, decode_responses=True)
