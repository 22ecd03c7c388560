"""The Redis store: script loading, NOSCRIPT recovery, fail-closed behaviour."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from meter import Meter, StoreUnavailable
from meter._scripts import OPERATIONS, ScriptRegistry
from tests.conftest import MeterFactory

pytestmark = pytest.mark.redis


def test_registry_computes_sha1_of_library_plus_operation() -> None:
    import hashlib

    reg = ScriptRegistry()
    assert set(reg.scripts) == set(OPERATIONS)
    for script in reg.scripts.values():
        assert script.sha == hashlib.sha1(script.text.encode()).hexdigest()
        assert "local function roll_period" in script.text  # the library is prepended


async def test_script_flush_between_calls(make_meter: MeterFactory, lua_backend: str) -> None:
    meter = await make_meter(lua_backend)
    await meter.open_account("u1")
    await meter.store.redis.script_flush()  # type: ignore[attr-defined]
    assert (await meter.debit("u1", 5)).allowed
    await meter.store.redis.script_flush()  # type: ignore[attr-defined]
    results = await asyncio.gather(*(meter.debit("u1", 1) for _ in range(50)))  # one batch
    assert all(d.allowed for d in results)
    assert (await meter.balance("u1")).used_tokens == 55


async def test_redis_refusing_connections_fails_closed() -> None:
    with contextlib.closing(__import__("socket").socket()) as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    meter = await Meter.connect(f"redis://127.0.0.1:{port}/0")
    with pytest.raises(StoreUnavailable):
        await meter.debit("u1", 1)
    with pytest.raises(StoreUnavailable):
        await meter.balance("u1")
    await meter.close()


async def test_redis_that_never_answers_fails_closed() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)
        await asyncio.sleep(5)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    meter = await Meter.connect(f"redis://127.0.0.1:{port}/0", timeout_ms=100)
    try:
        with pytest.raises(StoreUnavailable):
            await meter.debit("u1", 1)
    finally:
        server.close()
        await meter.close()
