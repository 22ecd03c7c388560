"""The wallet contract, run on every backend: reference model, fakeredis (Lua), real Redis."""

from __future__ import annotations

import pytest

from meter import FakeClock, IdempotencyConflict, Meter, UnknownAccount, UnknownHold
from meter._catalog import default_catalog, parse_catalog
from meter._clock import DAY_MS, month_end_ms, month_index
from tests.conftest import MeterFactory, journal_of

pytestmark = pytest.mark.redis


async def conservation(meter: Meter, account: str) -> None:
    """Sum of journal deltas == available + held; sum of usage == what was charged."""
    bal = await meter.balance(account)
    entries = await journal_of(meter, account)
    assert sum(e.delta for e in entries) == bal.remaining_tokens + bal.reserved_tokens
    charged = -sum(e.delta for e in entries if e.kind in ("usage", "settle"))
    assert charged == bal.used_tokens
    assert min(bal.rollover_tokens, bal.monthly_remaining, bal.bonus_tokens, bal.premium_tokens) >= 0
    if entries:
        last = entries[-1]
        assert last.available_after == bal.remaining_tokens
        assert last.held_after == bal.reserved_tokens
        state = (last.rollover_after, last.monthly_after, last.bonus_after, last.premium_after,
                 last.used_after, last.requests_after, last.plan)
        assert state == (bal.rollover_tokens, bal.monthly_remaining, bal.bonus_tokens, bal.premium_tokens,
                         bal.used_tokens, bal.total_requests, bal.plan)
        assert [e.seq for e in entries] == list(range(1, len(entries) + 1))


def catalog_with(**plan: int) -> object:
    data = {
        "inr_paise_per_usd": 8300,
        "plans": {"t": {"name": "T", "monthly_tokens": 1000, "price_inr_paise": 0, **plan}},
        "packs": {"p": {"name": "P", "tokens": 10, "price_inr_paise": 1}},
        "promo_codes": {"X": {"bonus_tokens": 1}},
        "models": {"m": {"name": "M", "input_usd_micros_per_mtok": 1, "output_usd_micros_per_mtok": 1}},
        "agents": {"a": {"name": "A", "estimate_tokens": 1, "model": "m"}},
    }
    return parse_catalog(data)


async def test_open_grants_allowance_once(meter: Meter) -> None:
    assert await meter.open_account("u1") is True
    assert await meter.open_account("u1") is False
    bal = await meter.balance("u1")
    assert (bal.monthly_allowance, bal.monthly_remaining, bal.remaining_tokens) == (10_000, 10_000, 10_000)
    assert bal.daily_request_limit == 100 and bal.max_tokens_per_request == 8192
    entries = await journal_of(meter, "u1")
    assert [(e.kind, e.delta, e.monthly) for e in entries] == [("allowance", 10_000, 10_000)]
    assert entries[0].note.startswith("welcome")


async def test_debit_and_seed_balance_fields(meter: Meter) -> None:
    await meter.open_account("u1")
    d = await meter.debit("u1", 3_500, agent="srs", model="sonnet", input_tokens=1200, output_tokens=2300)
    assert d.allowed and d.reason == "ok" and d.remaining == 6_500 and d.requests_today == 1
    assert d.transaction_id == "u1:2" and not d.replayed
    body = (await meter.balance("u1")).as_dict()
    assert body["monthly_used"] == 3_500 and body["monthly_remaining"] == 6_500
    assert body["monthly_used_percentage"] == 35.0
    assert body["used_tokens"] == 3_500 and body["total_tokens"] == 10_000
    assert body["requests_today"] == 1 and body["total_requests"] == 1
    assert body["month_reset_date"] == "2026-02-01T00:00:00"
    usage = (await journal_of(meter, "u1"))[-1]
    assert (usage.kind, usage.agent, usage.model, usage.input_tokens, usage.output_tokens) == (
        "usage", "srs", "sonnet", 1200, 2300)
    assert (usage.available_before, usage.available_after) == (10_000, 6_500)
    await conservation(meter, "u1")


async def test_burn_order_rollover_monthly_bonus_premium(meter: Meter, clock: FakeClock) -> None:
    await meter.open_account("u1")
    await meter.debit("u1", 8_000)  # monthly 2,000 left
    clock.set(month_end_ms(month_index(clock.now_ms())))  # next month: rollover 1,000
    await meter.credit("u1", 500, bucket="bonus", kind="bonus")
    await meter.credit("u1", 700, bucket="premium", kind="purchase")
    bal = await meter.balance("u1")
    assert (bal.rollover_tokens, bal.monthly_remaining, bal.bonus_tokens, bal.premium_tokens) == (
        1_000, 10_000, 500, 700)
    await meter.debit("u1", 1_200)  # 1,000 rollover + 200 monthly
    bal = await meter.balance("u1")
    assert (bal.rollover_tokens, bal.monthly_remaining) == (0, 9_800)
    for _ in range(2):
        await meter.debit("u1", 4_900)
    await meter.debit("u1", 600)  # 500 bonus + 100 premium
    bal = await meter.balance("u1")
    buckets = (bal.rollover_tokens, bal.monthly_remaining, bal.bonus_tokens, bal.premium_tokens)
    assert buckets == (0, 0, 0, 600)
    usage = [e for e in await journal_of(meter, "u1") if e.kind == "usage"]
    assert (usage[1].rollover, usage[1].monthly) == (-1_000, -200)
    assert (usage[-1].bonus, usage[-1].premium) == (-500, -100)
    await conservation(meter, "u1")


async def test_insufficient_changes_nothing_and_reports_shortage(meter: Meter) -> None:
    await meter.open_account("u1")
    await meter.debit("u1", 5_000)
    before = await journal_of(meter, "u1")
    d = await meter.debit("u1", 8_000)
    assert not d.allowed and d.reason == "insufficient" and d.shortage == 3_000 and d.remaining == 5_000
    assert d.transaction_id is None and d.requests_today == 1
    assert await journal_of(meter, "u1") == before


async def test_monthly_reset_rollover_and_expiry_across_two_months(meter: Meter, clock: FakeClock) -> None:
    await meter.open_account("u1")
    await meter.credit("u1", 300, bucket="bonus")
    await meter.debit("u1", 4_000)  # monthly 6,000 unused
    m0 = month_index(clock.now_ms())
    clock.set(month_end_ms(m0) + 5)  # month 1: rollover 3,000, monthly 10,000
    bal = await meter.balance("u1")
    assert (bal.rollover_tokens, bal.monthly_remaining, bal.bonus_tokens) == (3_000, 10_000, 300)
    assert bal.month_reset_ms == month_end_ms(m0 + 1)
    await meter.debit("u1", 1_000)  # from rollover: 2,000 rollover left, monthly untouched
    clock.set(month_end_ms(m0 + 1) + 5)  # month 2: old rollover expires, 50% of 10,000 rolls
    bal = await meter.balance("u1")
    assert (bal.rollover_tokens, bal.monthly_remaining, bal.bonus_tokens) == (5_000, 10_000, 300)
    kinds = [(e.kind, e.rollover, e.monthly) for e in await journal_of(meter, "u1")]
    assert kinds[-3:] == [("expiry", -2_000, -5_000), ("rollover", 5_000, -5_000), ("allowance", 0, 10_000)]
    clock.set(month_end_ms(m0 + 3) + 5)  # skip a month: nothing rolls twice
    bal = await meter.balance("u1")
    assert (bal.rollover_tokens, bal.monthly_remaining, bal.bonus_tokens) == (0, 10_000, 300)
    await conservation(meter, "u1")


async def test_period_never_moves_backwards(meter: Meter, clock: FakeClock) -> None:
    await meter.open_account("u1")
    clock.set(month_end_ms(month_index(clock.now_ms())) + 1)
    await meter.debit("u1", 100)
    n = len(await journal_of(meter, "u1"))
    clock.advance(-40 * DAY_MS)  # an older "now" is treated as the stored period
    d = await meter.debit("u1", 100)
    assert d.allowed and d.requests_today == 2
    assert len(await journal_of(meter, "u1")) == n + 1
    await conservation(meter, "u1")


async def test_daily_cap_resets_at_utc_midnight(make_meter: MeterFactory, backend: str,
                                                clock: FakeClock) -> None:
    meter = await make_meter(backend, catalog=catalog_with(daily_requests=3))
    await meter.open_account("u1", plan="t")
    assert all([(await meter.debit("u1", 1)).allowed for _ in range(3)])
    d = await meter.debit("u1", 1)
    assert (d.allowed, d.reason, d.requests_today, d.daily_request_limit) == (False, "daily_cap", 3, 3)
    assert d.retry_after_ms == (clock.now_ms() // DAY_MS + 1) * DAY_MS - clock.now_ms()
    clock.advance(d.retry_after_ms)
    d = await meter.debit("u1", 1)
    assert d.allowed and d.requests_today == 1
    assert (await meter.balance("u1")).total_requests == 4


async def test_per_minute_limit_gcra(make_meter: MeterFactory, backend: str, clock: FakeClock) -> None:
    meter = await make_meter(backend, catalog=catalog_with(requests_per_minute=6))
    await meter.open_account("u1", plan="t")
    assert all([(await meter.debit("u1", 1)).allowed for _ in range(6)])  # a full minute's burst
    d = await meter.debit("u1", 1)
    assert d.reason == "rate_limited" and d.retry_after_ms == 10_000
    clock.advance(9_999)
    assert (await meter.debit("u1", 1)).reason == "rate_limited"
    clock.advance(1)
    assert (await meter.debit("u1", 1)).allowed
    assert (await meter.debit("u1", 1)).reason == "rate_limited"
    assert (await meter.balance("u1")).requests_today == 7


async def test_idempotent_replay_and_conflict(meter: Meter) -> None:
    await meter.open_account("u1")
    first = await meter.debit("u1", 700, agent="code", request_id="req-1")
    again = await meter.debit("u1", 700, agent="code", request_id="req-1")
    assert again.replayed and not first.replayed
    assert again == type(first)(**{**{s: getattr(first, s) for s in first.__slots__}, "replayed": True})
    with pytest.raises(IdempotencyConflict):
        await meter.debit("u1", 701, agent="code", request_id="req-1")
    with pytest.raises(IdempotencyConflict):
        await meter.credit("u1", 700, request_id="req-1")
    bal = await meter.balance("u1")
    assert bal.remaining_tokens == 9_300 and bal.total_requests == 1
    # the same request id on another account is another request
    await meter.open_account("u2")
    assert not (await meter.debit("u2", 700, agent="code", request_id="req-1")).replayed


async def test_reserve_settle_less_returns_rest_to_its_buckets(meter: Meter) -> None:
    await meter.open_account("u1")
    await meter.credit("u1", 5_000, bucket="premium", kind="purchase")
    await meter.debit("u1", 8_000)  # monthly 2,000 + premium 5,000
    hold = await meter.reserve("u1", 4_000, agent="code")  # 2,000 monthly + 2,000 premium
    assert hold.allowed and hold.hold_id and hold.reserved == 4_000 and hold.remaining == 3_000
    r = await meter.settle("u1", hold.hold_id, 2_500, agent="code", model="sonnet")
    assert (r.charged, r.uncollected, r.reserved, r.remaining) == (2_500, 0, 0, 4_500)
    bal = await meter.balance("u1")
    assert (bal.monthly_remaining, bal.premium_tokens) == (0, 4_500)
    assert bal.used_tokens == 10_500 and bal.requests_today == 2
    with pytest.raises(UnknownHold):
        await meter.settle("u1", hold.hold_id, 1)
    await conservation(meter, "u1")


async def test_settle_beyond_hold_takes_balance_then_reports_uncollected(meter: Meter) -> None:
    await meter.open_account("u1")
    await meter.debit("u1", 7_000)
    hold = await meter.reserve("u1", 2_000)
    assert hold.hold_id is not None
    r = await meter.settle("u1", hold.hold_id, 4_500)  # 2,000 held + 1,000 left + 1,500 short
    assert (r.charged, r.uncollected, r.remaining, r.reserved) == (3_000, 1_500, 0, 0)
    assert (await meter.balance("u1")).remaining_tokens == 0
    await conservation(meter, "u1")


async def test_release_and_lazy_expiry(meter: Meter, clock: FakeClock) -> None:
    await meter.open_account("u1")
    h1 = await meter.reserve("u1", 1_000, ttl_ms=5_000)
    h2 = await meter.reserve("u1", 2_000, ttl_ms=60_000)
    assert h1.hold_id and h2.hold_id
    r = await meter.release("u1", h1.hold_id)
    assert (r.tokens, r.remaining, r.reserved) == (1_000, 8_000, 2_000)
    with pytest.raises(UnknownHold):
        await meter.release("u1", h1.hold_id)
    clock.advance(60_000)  # h2 expires; the next touch releases it
    bal = await meter.balance("u1")
    assert (bal.remaining_tokens, bal.reserved_tokens) == (10_000, 0)
    with pytest.raises(UnknownHold):
        await meter.settle("u1", h2.hold_id, 10)
    notes = [e.note for e in await journal_of(meter, "u1") if e.kind == "release"]
    assert notes == ["", "hold expired"]
    await conservation(meter, "u1")


async def test_sweep_releases_expired_holds(meter: Meter, clock: FakeClock) -> None:
    await meter.open_account("u1")
    for _ in range(3):
        await meter.reserve("u1", 100, ttl_ms=1_000)
    clock.advance(1_000)
    assert await meter.sweep_account("u1", limit=2) == 2
    assert await meter.sweep_account("u1") == 1
    assert await meter.sweep_account("u1") == 0
    assert (await meter.balance("u1")).reserved_tokens == 0
    await conservation(meter, "u1")


async def test_hold_across_month_end_expires_its_monthly_part(meter: Meter, clock: FakeClock) -> None:
    await meter.open_account("u1")
    await meter.credit("u1", 1_000, bucket="premium", kind="purchase")
    await meter.debit("u1", 4_500)
    await meter.debit("u1", 4_500)
    end = month_end_ms(month_index(clock.now_ms()))
    clock.set(end - 3_600_000)
    hold = await meter.reserve("u1", 1_500, ttl_ms=7_200_000)  # 1,000 monthly + 500 premium
    assert hold.hold_id is not None
    clock.set(end + 1)
    r = await meter.release("u1", hold.hold_id)
    assert r.tokens == 500  # the monthly part expired with its month; premium comes back
    bal = await meter.balance("u1")
    assert (bal.rollover_tokens, bal.monthly_remaining, bal.premium_tokens) == (0, 10_000, 1_000)
    await conservation(meter, "u1")


async def test_unknown_account(meter: Meter) -> None:
    with pytest.raises(UnknownAccount):
        await meter.debit("ghost", 1)
    with pytest.raises(UnknownAccount):
        await meter.balance("ghost")


async def test_rehydrate_from_loader(backend: str, make_meter: MeterFactory) -> None:
    source = await make_meter(backend)
    await source.open_account("u1")
    await source.debit("u1", 1_234)
    snapshot = await source.snapshot("u1")

    async def loader(account_id: str) -> dict[str, str] | None:
        return snapshot if account_id == "u1" else None

    meter = await make_meter(backend, loader=loader)
    d = await meter.debit("u1", 1_000)
    assert d.allowed and d.remaining == 10_000 - 1_234 - 1_000 and d.transaction_id == "u1:3"
    with pytest.raises(UnknownAccount):
        await meter.debit("u2", 1)


@pytest.mark.parametrize("holds_known", [True, False])
async def test_rehydrate_restores_open_holds(backend: str, make_meter: MeterFactory, holds_known: bool) -> None:
    """The load script restores the holds it is given when they add up to the held balance;
    otherwise the held tokens come back as bonus (journaled)."""
    source = await make_meter(backend)
    await source.open_account("u1")
    hold = await source.reserve("u1", 3_000, ttl_ms=60_000)
    assert hold.hold_id and hold.expires_at_ms
    snapshot: dict[str, str] = await source.snapshot("u1")
    period = snapshot["per"]
    record = f"3000:0:3000:0:0:{period}:{hold.expires_at_ms}" if holds_known else f"2000:0:2000:0:0:{period}:1"

    async def loader(account_id: str) -> dict[str, str] | None:
        return {**snapshot, f"hold:{hold.hold_id}": record}

    meter = await make_meter(backend, loader=loader)
    assert await meter.rehydrate("u1")
    bal = await meter.balance("u1")
    if holds_known:
        assert (bal.remaining_tokens, bal.reserved_tokens, bal.bonus_tokens) == (7_000, 3_000, 0)
        r = await meter.settle("u1", hold.hold_id, 1_000)
        assert (r.charged, r.remaining, r.reserved) == (1_000, 9_000, 0)
    else:
        assert (bal.remaining_tokens, bal.reserved_tokens, bal.bonus_tokens) == (10_000, 0, 3_000)
        with pytest.raises(UnknownHold):
            await meter.settle("u1", hold.hold_id, 1_000)


def test_default_catalog_is_the_seed() -> None:
    cat = default_catalog()
    assert {p: (x.monthly_tokens, x.price_inr_paise) for p, x in cat.plans.items()} == {
        "free": (10_000, 0), "basic": (50_000, 29_900), "pro": (250_000, 99_900)}
    assert cat.plans["free"].daily_requests == 100
    assert cat.plans["free"].max_tokens_per_request == 8_192 and cat.plans["free"].rollover_pct == 50
    assert {p: (x.tokens, x.price_inr_paise, x.popular) for p, x in cat.packs.items()} == {
        "starter": (50_000, 9_900, False), "pro": (200_000, 34_900, True),
        "unlimited": (1_000_000, 149_900, False)}
    assert {c: x.bonus_tokens for c, x in cat.promo_codes.items()} == {
        "WELCOME2024": 10_000, "LAUNCH50": 50_000, "BETA100": 100_000}
    assert {a: x.estimate_tokens for a, x in cat.agents.items()} == {
        "idea": 2_000, "srs": 3_500, "code": 5_000, "uml": 2_500, "report": 4_000, "ppt": 1_500,
        "viva": 2_000}
    assert cat.inr_paise_per_usd == 8_300
    assert cat.cost_usd_micros("sonnet", 1_000_000, 0) == 3_000_000
    assert cat.usd_micros_to_inr_paise(2_450_000) == 20_335  # $2.45 -> ₹203.35


@pytest.mark.parametrize("plan_id", ["pro:annual", "a b", "", "x" * 33, "ünï"])
def test_a_plan_id_that_cannot_be_stored_is_refused(plan_id: str) -> None:
    """Plan ids go into ':'-separated fields in Redis and the journal: a bad one fails at load."""
    import tomllib
    from importlib import resources

    from meter._catalog import CatalogError

    good = tomllib.loads(resources.files("meter").joinpath("catalog.toml").read_text())
    good["plans"][plan_id] = dict(good["plans"]["free"])
    with pytest.raises(CatalogError, match="plan id"):
        parse_catalog(good)
    del good["plans"][plan_id]
    good["plans"]["pro.annual-2"] = dict(good["plans"]["free"])
    assert "pro.annual-2" in parse_catalog(good).plans


async def test_upgrade_mid_month_raises_monthly_to_new_allowance_minus_used(meter: Meter) -> None:
    await meter.open_account("u1")  # free: 10,000
    await meter.debit("u1", 3_500)
    hold = await meter.reserve("u1", 500)
    r = await meter.set_plan("u1", "pro", note="upgrade")  # 250,000 - (3,500 + 500 held) used
    assert r.tokens == 246_000 - 6_000
    bal = await meter.balance("u1")
    assert (bal.plan, bal.monthly_allowance, bal.monthly_remaining) == ("pro", 250_000, 246_000)
    assert bal.daily_request_limit == 5_000 and bal.monthly_used == 4_000
    assert hold.hold_id is not None
    await meter.release("u1", hold.hold_id)
    assert (await meter.balance("u1")).monthly_remaining == 246_500
    last = [e for e in await journal_of(meter, "u1") if e.kind == "allowance"][-1]
    assert (last.monthly, last.plan) == (240_000, "pro")
    await conservation(meter, "u1")


async def test_downgrade_waits_for_the_period_boundary(meter: Meter, clock: FakeClock) -> None:
    await meter.open_account("u1", plan="pro")
    await meter.debit("u1", 8_000)
    r = await meter.set_plan("u1", "free", when="next", note="downgrade")
    assert r.tokens == 0
    bal = await meter.balance("u1")
    assert (bal.plan, bal.monthly_remaining, bal.pending_plan) == ("pro", 242_000, "free")
    clock.set(month_end_ms(month_index(clock.now_ms())) - 1)
    assert (await meter.balance("u1")).plan == "pro"
    clock.advance(1)  # the boundary: the rollover follows the old plan (50% of 242,000), then free
    bal = await meter.balance("u1")
    assert (bal.plan, bal.monthly_allowance, bal.monthly_remaining, bal.rollover_tokens) == (
        "free", 10_000, 10_000, 121_000)
    assert bal.daily_request_limit == 100 and bal.pending_plan == ""
    await conservation(meter, "u1")


async def test_adjust_takes_back_what_is_unspent_and_reports_the_rest_owed(meter: Meter) -> None:
    await meter.open_account("u1")
    await meter.credit("u1", 50_000, bucket="premium", kind="purchase", reference="order-1")
    for _ in range(5):
        await meter.debit("u1", 8_000)  # 10,000 monthly, then 30,000 of the premium pack
    r = await meter.adjust("u1", 50_000, bucket="premium", kind="refund", reference="order-1")
    assert (r.tokens, r.uncollected, r.remaining) == (20_000, 30_000, 0)
    nothing = await meter.adjust("u1", 10, bucket="premium", kind="refund")
    assert (nothing.tokens, nothing.uncollected, nothing.transaction_id) == (0, 10, "")
    refund = [e for e in await journal_of(meter, "u1") if e.kind == "refund"]
    assert [(e.premium, e.reference) for e in refund] == [(-20_000, "order-1")]
    await conservation(meter, "u1")
