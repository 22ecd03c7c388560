"""Finding 11 (part): a user could open any number of balance streams (each one polls Redis four
times a second). At most `sse_max_streams` per user, across workers (counted in Redis); 429
beyond; a closed stream gives its slot back. Over a real socket: httpx's in-process transport
buffers whole responses, and a stream never ends."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn

from api.app import create_app
from api.security import issue_token
from meter import keys as keyspace
from tests.api.conftest import make_settings
from tests.conftest import DATABASES

CAP = 2


@contextlib.asynccontextmanager
async def served(settings: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    serving = asyncio.create_task(server.serve())
    try:
        for _ in range(200):
            if server.started or serving.done():
                break
            await asyncio.sleep(0.05)
        assert server.started
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            yield client, app
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 30)
        if settings.redis_url:
            import redis.asyncio as aredis

            r = aredis.Redis.from_url(settings.redis_url)
            keys = [k async for k in r.scan_iter(match=f"{settings.key_prefix}:*")]
            if keys:
                await r.delete(*keys)
            await r.aclose()


@contextlib.asynccontextmanager
async def open_stream(client: httpx.AsyncClient, auth: dict[str, str]) -> AsyncIterator[httpx.Response]:
    """A stream whose first event has arrived (the slot is held), or the refusal."""
    async with client.stream("GET", "/api/v1/tokens/stream", headers=auth) as r:
        if r.status_code == 200:
            # read by hand and kept: an abandoned line iterator, once collected, closes the connection
            lines = r.aiter_lines()
            while not (await anext(lines)).startswith("data: "):
                pass
        else:
            await r.aread()
        yield r


@pytest.mark.parametrize("database", DATABASES)
async def test_streams_per_user_are_capped(request: pytest.FixtureRequest, tmp_path: Any, database: str) -> None:
    db = {"database_url": request.getfixturevalue("pg_database")} if database == "postgres" else {}
    settings = make_settings(tmp_path, sse_max_streams=CAP, **db)
    async with served(settings) as (client, app):
        r = await client.post("/api/v1/auth/register", json={"email": f"sse-{settings.key_prefix}@example.com",
                                                              "password": "a-fine-long-password"})
        assert r.status_code == 201, r.text
        user = r.json()["user_id"]
        auth = {"Authorization": f"Bearer {r.json()['access_token']}"}
        async with contextlib.AsyncExitStack() as streams:
            for _ in range(CAP):
                assert (await streams.enter_async_context(open_stream(client, auth))).status_code == 200
            async with open_stream(client, auth) as refused:
                assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
                assert refused.json()["error"] == "too_many_streams"
            other_user = f"u_other{settings.key_prefix}"  # another user is not affected
            app.state.tm.auth.accounts.add(other_user)  # known to exist (no accounts row needed)
            await app.state.tm.rt.meter.open_account(other_user)
            other = {"Authorization": f"Bearer {issue_token(app.state.tm.jwt_secret, other_user, 600)}"}
            async with open_stream(client, other) as r:
                assert r.status_code == 200
        # both closed: their slots come back (the server notices the disconnect within ~250 ms)
        slots = keyspace.stream_slots_key(user, shards=settings.shards, prefix=settings.key_prefix)
        for _ in range(100):
            if not await app.state.tm.rt.redis.zcard(slots):
                break
            await asyncio.sleep(0.05)
        async with open_stream(client, auth) as again:
            assert again.status_code == 200
