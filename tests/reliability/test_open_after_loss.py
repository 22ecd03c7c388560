"""Finding 3: opening an account after a Redis loss never resets it. FLUSHALL after a drain,
with an open hold; open again → the account comes back from the ledger (balance, hold, seq),
the open answers "already existed", and the books agree afterwards."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from meter import FakeClock, Meter
from persistence.reconcile import reconcile
from tests.reliability._redis_loss import (
    PrivateRedis,
    dead_letters,
    flusher,
    ledger_rows,
    loss_meter,
    private_redis_server,
)

pytestmark = [pytest.mark.redis, pytest.mark.postgres]


@pytest.fixture
async def private_redis(tmp_path: Any) -> AsyncIterator[PrivateRedis]:
    async with private_redis_server(str(tmp_path)) as server:
        yield server


async def test_open_after_flushall_rehydrates_instead_of_resetting(private_redis: PrivateRedis, database: Any,
                                                                   clock: FakeClock) -> None:
    meter: Meter = await loss_meter(private_redis.url, database, clock)
    try:
        assert await meter.open_account("u1", "pro")
        await meter.credit("u1", 500, bucket="premium", kind="purchase")
        charged = 0
        for i in range(7):
            d = await meter.debit("u1", 1_000 + i, request_id=f"d{i}")
            assert d.allowed
            charged += 1_000 + i
        hold = await meter.reserve("u1", 300, ttl_ms=600_000)
        assert hold.allowed and hold.hold_id
        before = await meter.balance("u1")
        assert await flusher(meter, database).drain() > 0
        await meter.store.redis.flushall()  # type: ignore[attr-defined]

        assert await meter.open_account("u1", "pro") is False  # it existed: not opened again
        after = await meter.balance("u1")
        assert (after.monthly_remaining, after.premium_tokens, after.reserved_tokens, after.used_tokens) == (
            before.monthly_remaining, before.premium_tokens, 300, before.used_tokens)
        assert after.monthly_remaining == 250_000 - charged - 300
        d = await meter.debit("u1", 40)
        assert d.allowed and d.transaction_id == "u1:11"  # welcome, purchase, 7 debits, hold: then 11
        assert (await meter.settle("u1", hold.hold_id, 100)).charged == 100  # the hold came back

        assert await meter.open_account("fresh", "free")  # unknown to Redis and the ledger: created
        assert (await meter.balance("fresh")).monthly_remaining == 10_000
        await flusher(meter, database).drain()
        assert await dead_letters(meter) == 0
        rows = await ledger_rows(database, "u1")
        assert [r.seq for r in rows] == list(range(1, 13))  # one row per entry, none reused
        assert sum(r.tokens_changed + r.held_changed for r in rows) == 250_000 + 500 - charged - 40 - 100
        final = await meter.balance("u1")
        assert final.remaining_tokens == rows[-1].tokens_after and final.reserved_tokens == 0
        checks = await reconcile(meter.store.redis, database, shards=meter.shards, prefix=meter.prefix)  # type: ignore[attr-defined]
        assert {c.account_id: c.status for c in checks} == {"u1": "ok", "fresh": "ok"}
    finally:
        await meter.close()
