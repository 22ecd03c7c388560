"""Usage after the fact (`Meter.record_usage`) and idempotency scoped by operation, on every
backend: the reference model, fakeredis (Lua) and the real Redis."""

from __future__ import annotations

import pytest

from meter import FakeClock, IdempotencyConflict, InvalidInput, Meter, UnknownAccount
from meter._calls import scoped_request_id
from tests.conftest import MeterFactory, journal_of
from tests.meter.test_wallet import catalog_with, conservation

pytestmark = pytest.mark.redis


async def test_usage_is_charged_in_burn_order_and_journaled_with_its_labels(meter: Meter) -> None:
    await meter.open_account("u1")
    await meter.credit("u1", 500, bucket="premium", kind="purchase")
    r = await meter.record_usage("u1", 10_200, agent="code", model="gpt-4o-mini", input_tokens=10_000,
                                 output_tokens=200, project_id="p1")
    assert (r.tokens, r.charged, r.uncollected, r.remaining, r.replayed) == (10_200, 10_200, 0, 300, False)
    bal = await meter.balance("u1")
    assert (bal.monthly_remaining, bal.premium_tokens, bal.used_tokens) == (0, 300, 10_200)
    assert (bal.requests_today, bal.tokens_used_today, bal.total_requests) == (1, 10_200, 1)
    usage = (await journal_of(meter, "u1"))[-1]
    assert (usage.kind, usage.monthly, usage.premium, usage.model, usage.agent) == (
        "usage", -10_000, -200, "gpt-4o-mini", "code")
    assert (usage.input_tokens, usage.output_tokens, usage.project_id, usage.note) == (10_000, 200, "p1", "")
    assert r.transaction_id == f"u1:{usage.seq}"
    await conservation(meter, "u1")


async def test_usage_beyond_the_balance_is_uncollected_never_negative(meter: Meter) -> None:
    await meter.open_account("u1")
    await meter.debit("u1", 8_000)
    r = await meter.record_usage("u1", 5_000)
    assert (r.charged, r.uncollected, r.remaining) == (2_000, 3_000, 0)
    empty = await meter.record_usage("u1", 700)  # nothing left: recorded, all of it owed
    assert (empty.charged, empty.uncollected, empty.remaining) == (0, 700, 0)
    entries = await journal_of(meter, "u1")
    assert [e.note for e in entries[-2:]] == ["uncollected 3000", "uncollected 700"]
    assert (await meter.balance("u1")).used_tokens == 10_000
    await conservation(meter, "u1")


async def test_usage_ignores_the_per_request_maximum_and_the_daily_and_minute_limits(
        make_meter: MeterFactory, backend: str) -> None:
    meter = await make_meter(backend, catalog=catalog_with(daily_requests=2, requests_per_minute=2,
                                                           max_tokens_per_request=100))
    await meter.open_account("u1", plan="t")
    assert all([(await meter.debit("u1", 10)).allowed for _ in range(2)])
    assert (await meter.debit("u1", 10)).reason == "daily_cap"
    with pytest.raises(InvalidInput):
        await meter.debit("u1", 101)
    r = await meter.record_usage("u1", 500)  # what was used is recorded anyway
    assert (r.charged, r.uncollected, r.remaining) == (500, 0, 480)
    bal = await meter.balance("u1")
    assert (bal.requests_today, bal.used_tokens) == (3, 520)
    await conservation(meter, "u1")


async def test_usage_is_charged_once_per_request_id(meter: Meter) -> None:
    await meter.open_account("u1")
    first = await meter.record_usage("u1", 1_000, model="sonnet", request_id="evt-1")
    again = await meter.record_usage("u1", 1_000, model="sonnet", request_id="evt-1")
    assert again.replayed and (again.charged, again.transaction_id) == (first.charged, first.transaction_id)
    with pytest.raises(IdempotencyConflict):
        await meter.record_usage("u1", 1_001, model="sonnet", request_id="evt-1")
    # usage shares debit's namespace: the same id there is a conflict, never a second charge
    await meter.debit("u1", 10, request_id="call-9")
    with pytest.raises(IdempotencyConflict):
        await meter.record_usage("u1", 10, request_id="call-9")
    bal = await meter.balance("u1")
    assert (bal.used_tokens, bal.total_requests) == (1_010, 2)


async def test_usage_input_is_checked_before_anything_changes(meter: Meter) -> None:
    await meter.open_account("u1")
    for bad in ({"tokens": -1}, {"tokens": 1.5}, {"tokens": True}, {"tokens": 1, "input_tokens": -2},
                {"tokens": 1, "model": "bad model!"}, {"tokens": 1, "request_id": "x" * 256}):
        with pytest.raises(InvalidInput):
            await meter.record_usage("u1", **bad)  # type: ignore[arg-type]
    with pytest.raises(UnknownAccount):
        await meter.record_usage("nobody", 10)
    zero = await meter.record_usage("u1", 0)
    assert (zero.charged, zero.uncollected, zero.remaining) == (0, 0, 10_000)
    assert (await meter.balance("u1")).total_requests == 1


async def test_usage_after_a_month_end_lands_in_the_new_period(meter: Meter, clock: FakeClock) -> None:
    await meter.open_account("u1")
    await meter.debit("u1", 4_000)
    clock.advance(40 * 86_400_000)
    r = await meter.record_usage("u1", 100)  # the reset runs first: half of the 6,000 left rolls over
    assert r.remaining == 10_000 + 3_000 - 100
    kinds = [e.kind for e in await journal_of(meter, "u1")]
    assert kinds[-4:] == ["expiry", "rollover", "allowance", "usage"]
    await conservation(meter, "u1")


async def test_reserve_and_settle_of_one_call_may_share_an_idempotency_key(meter: Meter) -> None:
    await meter.open_account("u1")
    hold = await meter.reserve("u1", 2_000, request_id="call-1")
    assert hold.allowed and hold.hold_id
    s = await meter.settle("u1", hold.hold_id, 1_500, request_id="call-1")
    again = await meter.settle("u1", hold.hold_id, 1_500, request_id="call-1")
    assert (s.charged, s.replayed, again.replayed, again.charged) == (1_500, False, True, 1_500)
    assert (await meter.reserve("u1", 2_000, request_id="call-1")).replayed  # the reserve's own answer
    with pytest.raises(IdempotencyConflict) as conflict:
        await meter.settle("u1", hold.hold_id, 1_400, request_id="call-1")
    assert conflict.value.request_id == "call-1"  # the caller's key, not the stored form
    h2 = await meter.reserve("u1", 300, request_id="call-2")
    assert h2.hold_id
    rel = await meter.release("u1", h2.hold_id, request_id="call-2")
    assert rel.tokens == 300 and (await meter.release("u1", h2.hold_id, request_id="call-2")).replayed
    bal = await meter.balance("u1")
    assert (bal.used_tokens, bal.reserved_tokens, bal.remaining_tokens) == (1_500, 0, 8_500)
    rq = [e.request_id for e in await journal_of(meter, "u1") if e.request_id]
    assert rq == ["call-1", "settle:call-1", "call-2", "release:call-2"]
    await conservation(meter, "u1")


def test_a_scoped_request_id_fits_the_ledger_column() -> None:
    assert scoped_request_id("settle", "") == ""
    assert scoped_request_id("settle", "k") == "settle:k"
    long_a, long_b = "a" * 255, "a" * 254 + "b"
    assert scoped_request_id("release", "x" * 247) == "release:" + "x" * 247
    scoped = {scoped_request_id("settle", long_a), scoped_request_id("settle", long_b)}
    assert len(scoped) == 2 and all(len(s) <= 255 and s.startswith("settle:#") for s in scoped)


async def test_an_answer_stored_with_the_older_24_character_fingerprint_still_replays(meter: Meter) -> None:
    import hashlib

    from meter import ReferenceStore
    from meter import keys as keyspace

    await meter.open_account("u1")
    first = await meter.debit("u1", 300, model="sonnet", request_id="old-1")
    key = keyspace.idempotency_key("u1", "old-1", shards=meter.shards, prefix=meter.prefix)
    store = meter.store
    stored = store.idempotency[key] if isinstance(store, ReferenceStore) else \
        await store.redis.get(key)  # type: ignore[attr-defined]
    fp, _, reply = stored.partition("\n")
    legacy = hashlib.blake2b("\x1f".join(map(str, ("debit", 300, "", "sonnet", "", "", ""))).encode(),
                             digest_size=12).hexdigest()
    assert len(fp) == 16 and legacy[:16] == fp  # the new form is the old one's prefix
    if isinstance(store, ReferenceStore):
        store.idempotency[key] = f"{legacy}\n{reply}"
    else:
        await store.redis.set(key, f"{legacy}\n{reply}", ex=600)  # type: ignore[attr-defined]
    again = await meter.debit("u1", 300, model="sonnet", request_id="old-1")
    assert again.replayed and again.transaction_id == first.transaction_id
    with pytest.raises(IdempotencyConflict):
        await meter.debit("u1", 301, model="sonnet", request_id="old-1")
    assert (await meter.balance("u1")).used_tokens == 300
