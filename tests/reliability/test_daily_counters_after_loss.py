"""Finding 8: rehydration keeps the day's counters, so the daily cap does not start over after
a Redis loss, nor on the embedded default (in-process Redis) after a restart. A snapshot of an
earlier day gives today's counters at zero."""

from __future__ import annotations

from typing import Any

import pytest

from meter import FakeClock, Meter
from persistence.rehydrate import SnapshotLoader
from tests.reliability._redis_loss import flusher, loss_meter, private_redis_server

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

DAY_MS = 86_400_000


async def test_daily_cap_holds_across_flushall(tmp_path: Any, database: Any, clock: FakeClock) -> None:
    clock.set(clock.now_ms() // DAY_MS * DAY_MS + 3_600_000)  # 01:00 UTC: the day has hours left
    async with private_redis_server(str(tmp_path)) as server:
        meter = await loss_meter(server.url, database, clock)
        try:
            assert await meter.open_account("u1", "free")  # 100 requests a day
            for _ in range(44):
                assert (await meter.debit("u1", 10)).allowed
            await flusher(meter, database).drain()
            await meter.store.redis.flushall()  # type: ignore[attr-defined]
            bal = await meter.balance("u1")
            assert (bal.requests_today, bal.tokens_used_today) == (44, 440)
            allowed = [(await meter.debit("u1", 10)).allowed for _ in range(60)]
            assert allowed == [True] * 56 + [False] * 4  # 100 in the day, not 144

            await flusher(meter, database).drain()
            clock.advance(DAY_MS)
            await meter.store.redis.flushall()  # type: ignore[attr-defined]
            bal = await meter.balance("u1")  # yesterday's snapshot: a new day starts at zero
            assert (bal.requests_today, bal.tokens_used_today, bal.used_tokens) == (0, 0, 1_000)
        finally:
            await meter.close()


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_embedded_default_keeps_the_daily_counters_across_a_restart(database: Any, clock: FakeClock) -> None:
    async def embedded() -> Meter:  # what `serve` runs without REDIS_URL: Redis in the process
        meter = await Meter.connect("fakeredis://", clock=clock)
        meter.loader = SnapshotLoader(database, meter.store.redis, meter.catalog, clock=clock)  # type: ignore[attr-defined]
        return meter

    first = await embedded()
    assert await first.open_account("u1", "free")
    for _ in range(7):
        assert (await first.debit("u1", 5)).allowed
    await flusher(first, database).drain()
    await first.close()
    second = await embedded()  # the restart: an empty in-process Redis
    try:
        bal = await second.balance("u1")
        assert (bal.requests_today, bal.tokens_used_today, bal.remaining_tokens) == (7, 35, 10_000 - 35)
    finally:
        await second.close()
