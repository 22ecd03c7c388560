"""The flusher is visible wherever it runs: the backlog per shard comes from Redis
(persistence.backlog: any process can compute it), the service's /metrics shows it with an
external flusher, and `tokenmeter flusher --metrics-port` serves the flusher's own counters."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import urllib.request
from typing import Any

import pytest

from meter import keys as keyspace
from persistence.backlog import backlog
from persistence.flusher import Flusher
from tests.api.conftest import make_settings, running_app
from tests.conftest import REDIS_URL, MeterFactory
from tests.processes import free_port, start_process, stop_process

pytestmark = [pytest.mark.redis]


def _samples(text: str, name: str) -> dict[str, float]:
    """shard label -> value of one labelled metric in a Prometheus text page."""
    return {m.group(1): float(m.group(2))
            for m in re.finditer(rf'^{name}{{shard="(\d+)"}} (\S+)$', text, re.MULTILINE)}


def _value(text: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else -1.0


@pytest.mark.usefixtures("real_redis")
async def test_backlog_per_shard_from_redis(make_meter: MeterFactory) -> None:
    meter = await make_meter("redis")
    redis = meter.store.redis  # type: ignore[attr-defined]
    accounts = [f"bl-{i}" for i in range(6)]
    for a in accounts:
        await meter.open_account(a)
        for _ in range(4):
            await meter.debit(a, 2)
    per_shard: dict[int, int] = {}
    for a in accounts:
        s = keyspace.shard_of(a, meter.shards)
        per_shard[s] = per_shard.get(s, 0) + 5
    await asyncio.sleep(0.05)  # entry ids are Redis's clock in ms: let the oldest age be > 0
    before = await backlog(redis, shards=meter.shards, prefix=meter.prefix)
    assert {b.shard: b.undelivered for b in before if b.undelivered} == per_shard  # no group yet: all waiting
    assert all(not b.group_exists and b.pending == 0 for b in before)
    assert all((b.oldest_unacked_age_s > 0) == (b.shard in per_shard) for b in before)

    flusher = Flusher(redis, None, shards=meter.shards, prefix=meter.prefix)  # type: ignore[arg-type]
    await flusher.setup()
    shard = keyspace.shard_of(accounts[0], meter.shards)
    stream = keyspace.journal_key(shard, meter.prefix)
    await redis.xreadgroup("tm-flusher", "reader", {stream: ">"}, count=3)  # read, never acknowledged
    now = {b.shard: b for b in await backlog(redis, shards=meter.shards, prefix=meter.prefix)}
    assert now[shard].pending == 3 and now[shard].undelivered == per_shard[shard] - 3
    assert now[shard].unflushed == per_shard[shard] and now[shard].group_exists
    assert now[shard].oldest_unacked_age_s > 0
    for s, n in per_shard.items():
        if s != shard:
            assert (now[s].pending, now[s].undelivered) == (0, n)
    lag = await flusher.lag()
    assert lag["pending"] == 3 and lag["oldest_unflushed_seconds"] > 0

    pending = await redis.xpending_range(stream, "tm-flusher", min="-", max="+", count=10)
    await redis.xack(stream, "tm-flusher", *[p["message_id"] for p in pending])
    await redis.xreadgroup("tm-flusher", "reader", {k: ">" for k in flusher.streams}, count=1000)
    for s in per_shard:
        key = keyspace.journal_key(s, meter.prefix)
        ids = [p["message_id"] for p in await redis.xpending_range(key, "tm-flusher", min="-", max="+", count=100)]
        await redis.xack(key, "tm-flusher", *ids)
    after = await backlog(redis, shards=meter.shards, prefix=meter.prefix)
    assert all((b.pending, b.undelivered, b.oldest_unacked_age_s) == (0, 0, 0.0) for b in after)


async def test_service_metrics_show_the_backlog_with_an_external_flusher(tmp_path: Any) -> None:
    async with running_app(make_settings(tmp_path, flusher="external")) as api:
        rt = api.state.rt
        await rt.meter.open_account("metrics-1")
        for _ in range(6):
            await rt.meter.debit("metrics-1", 3)
        await asyncio.sleep(0.05)
        shard = str(keyspace.shard_of("metrics-1", rt.settings.shards))
        page = (await api.client.get("/metrics")).text
        assert _samples(page, "tokenmeter_flusher_undelivered_entries")[shard] == 7
        assert _samples(page, "tokenmeter_flusher_lag_seconds")[shard] > 0
        await api.flush()  # a flusher somewhere else catches up
        await asyncio.sleep(1.1)  # the gauges are cached for a second
        page = (await api.client.get("/metrics")).text
        assert _samples(page, "tokenmeter_flusher_undelivered_entries")[shard] == 0
        assert _samples(page, "tokenmeter_flusher_pending_entries")[shard] == 0
        assert _samples(page, "tokenmeter_flusher_lag_seconds")[shard] == 0


@pytest.mark.usefixtures("real_redis")
async def test_flusher_process_serves_its_metrics(make_meter: MeterFactory, tmp_path: Any) -> None:
    meter = await make_meter("redis")
    port = free_port()
    env = {**os.environ, "REDIS_URL": REDIS_URL, "DATABASE_URL": str(tmp_path / "m.sqlite3"),
           "TOKENMETER_KEY_PREFIX": meter.prefix, "TOKENMETER_FLUSHER_BLOCK_MS": "50"}
    await meter.open_account("proc-metrics")
    for _ in range(9):
        await meter.debit("proc-metrics", 1)
    log = tmp_path / "flusher.log"
    with log.open("wb") as out:
        proc = start_process([sys.executable, "-m", "api.cli", "flusher", "--metrics-port", str(port)], env=env,
                             stdout=out, stderr=out)
    try:
        page, flushed = "", -1.0
        for _ in range(300):
            assert proc.poll() is None, log.read_text()[-1500:]
            try:
                page = await asyncio.to_thread(
                    lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode())
            except OSError:
                await asyncio.sleep(0.1)
                continue
            flushed = _value(page, "tokenmeter_flusher_entries_flushed_total")
            if flushed >= 10 and _samples(page, "tokenmeter_flusher_pending_entries"):
                break
            await asyncio.sleep(0.1)
        assert flushed == 10  # the welcome allowance and nine debits
        shard = str(keyspace.shard_of("proc-metrics", meter.shards))
        assert shard in _samples(page, "tokenmeter_flusher_lag_seconds")
    finally:
        stop_process(proc)
