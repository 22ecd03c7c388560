"""Finding 7: idempotency records survive a Redis loss. 50 requests with Idempotency-Keys
(debits, a reserve and its settle under the same key, a credit, usage after the fact), flushed;
FLUSHALL; every retry gets the stored answer (replayed, same transaction id and figures) and
charges nothing; one ledger row per stored key."""

from __future__ import annotations

from typing import Any

import pytest

from meter import FakeClock, IdempotencyConflict
from meter import keys as keyspace
from tests.reliability._redis_loss import dead_letters, flusher, ledger_rows, loss_meter, private_redis_server

pytestmark = [pytest.mark.redis, pytest.mark.postgres]


async def test_retries_after_flushall_are_answered_not_charged(tmp_path: Any, database: Any,
                                                               clock: FakeClock) -> None:
    async with private_redis_server(str(tmp_path)) as server:
        meter = await loss_meter(server.url, database, clock)
        try:
            assert await meter.open_account("u1", "pro")
            first = {}
            for i in range(46):
                first[f"d{i}"] = await meter.debit("u1", 50 + i, model="sonnet", request_id=f"d{i}")
            first["r"] = await meter.reserve("u1", 700, ttl_ms=600_000, request_id="r")
            hold = first["r"].hold_id
            assert hold
            first["s"] = await meter.settle("u1", hold, 500, request_id="r")  # settle has its own namespace
            first["c"] = await meter.credit("u1", 999, bucket="premium", kind="purchase", request_id="c")
            first["u"] = await meter.record_usage("u1", 9_000, model="gpt-4o", request_id="u")
            assert len(first) == 50
            await flusher(meter, database).drain()
            before = await meter.balance("u1")
            clock.advance(3_600_000)  # an hour later: well inside the 24 h
            await meter.store.redis.flushall()  # type: ignore[attr-defined]

            again = {f"d{i}": await meter.debit("u1", 50 + i, model="sonnet", request_id=f"d{i}") for i in range(46)}
            again["r"] = await meter.reserve("u1", 700, ttl_ms=600_000, request_id="r")
            again["s"] = await meter.settle("u1", hold, 500, request_id="r")
            again["c"] = await meter.credit("u1", 999, bucket="premium", kind="purchase", request_id="c")
            again["u"] = await meter.record_usage("u1", 9_000, model="gpt-4o", request_id="u")
            for rid, answer in again.items():
                assert answer.replayed, rid
                assert answer.transaction_id == first[rid].transaction_id, rid
                assert answer.remaining == first[rid].remaining, rid
            with pytest.raises(IdempotencyConflict):  # the same key with other parameters
                await meter.debit("u1", 51, request_id="d0")
            after = await meter.balance("u1")
            assert (after.remaining_tokens, after.reserved_tokens, after.used_tokens) == (
                before.remaining_tokens, before.reserved_tokens, before.used_tokens)

            await flusher(meter, database).drain()
            assert await dead_letters(meter) == 0
            rows = await ledger_rows(database, "u1")
            keyed = [r.request_id for r in rows if r.request_id]
            stored = [k for k in first if k != "s"] + ["settle:r"]  # the settle's key, as stored
            assert sorted(keyed) == sorted(stored)  # one row per key: nothing charged twice
            charged = sum(50 + i for i in range(46)) + 500 + 9_000
            assert sum(r.tokens_changed + r.held_changed for r in rows) == 250_000 + 999 - charged

            clock.advance(23 * 3_600_000 + 1_000)  # past the 24 h of d0's answer: not restored
            await meter.store.redis.flushall()  # type: ignore[attr-defined]
            late = await meter.debit("u1", 50, model="sonnet", request_id="d0")
            assert not late.replayed and late.allowed
        finally:
            await meter.close()


async def test_the_retention_is_a_setting_in_redis_and_in_rehydration(tmp_path: Any, database: Any,
                                                                       clock: FakeClock) -> None:
    """TOKENMETER_IDEMPOTENCY_TTL_S=600: Redis expires the answer after 10 min, and after a
    loss only answers younger than 10 min come back from the ledger."""
    async with private_redis_server(str(tmp_path)) as server:
        meter = await loss_meter(server.url, database, clock, idempotency_ttl_s=600)
        try:
            assert await meter.open_account("u1", "pro")
            old = await meter.debit("u1", 100, request_id="old")
            clock.advance(400_000)
            young = await meter.debit("u1", 100, request_id="young")
            redis = meter.store.redis  # type: ignore[attr-defined]
            key = keyspace.idempotency_key("u1", "young", shards=meter.shards, prefix=meter.prefix)
            assert 590 <= await redis.ttl(key) <= 600
            await flusher(meter, database).drain()
            clock.advance(300_000)  # old is 700 s old (past 600), young 300 s
            await redis.flushall()
            again = await meter.debit("u1", 100, request_id="young")
            assert again.replayed and again.transaction_id == young.transaction_id
            late = await meter.debit("u1", 100, request_id="old")  # its answer was not restored
            assert not late.replayed and late.transaction_id != old.transaction_id
            assert 0 < await redis.ttl(key) <= 300  # what was left of its 600 s
        finally:
            await meter.close()


def test_a_retention_outside_60_s_to_7_days_is_refused() -> None:
    from meter._scripts import ScriptRegistry

    for bad in (59, 7 * 86_400 + 1, True, 600.0):
        with pytest.raises(ValueError):
            ScriptRegistry(idempotency_ttl_s=bad)  # type: ignore[arg-type]
    assert "local IDEM_TTL_S = 3600\n" in ScriptRegistry(idempotency_ttl_s=3600)["debit"].text
