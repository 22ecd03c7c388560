"""A plan's allowance is granted once per month, however the plan changes within it: an upgrade
after a refund (or after moving down and up again) gets the new allowance minus what this month
already used, not a fresh one. On every backend."""

from __future__ import annotations

import pytest

from meter import FakeClock, Meter
from meter._clock import month_end_ms, month_index
from tests.meter.test_wallet import conservation

pytestmark = pytest.mark.redis


async def test_refunded_then_bought_again_the_same_month_grants_only_what_is_left(meter: Meter) -> None:
    await meter.open_account("u1")  # free: 10,000
    await meter.set_plan("u1", "pro", note="bought")  # pro: 250,000 this month
    for _ in range(25):
        await meter.debit("u1", 8_000)  # 200,000 of it used
    back = await meter.set_plan("u1", "free", note="refund: back to free")
    assert back.tokens == -50_000 and (await meter.balance("u1")).monthly_remaining == 0
    again = await meter.set_plan("u1", "pro", note="bought again")
    bal = await meter.balance("u1")
    assert (again.tokens, bal.monthly_remaining) == (50_000, 50_000)  # 250,000 - 200,000 used: not 240,000
    assert bal.monthly_used == 200_000
    await conservation(meter, "u1")


async def test_down_and_up_again_within_a_month_never_adds_up_to_more_than_the_allowance(meter: Meter) -> None:
    await meter.open_account("u1", plan="basic")  # 50,000
    for _ in range(7):
        await meter.debit("u1", 8_000)  # 56,000 asked, 50,000 monthly + nothing else: 6 fit
    bal = await meter.balance("u1")
    assert bal.monthly_remaining == 2_000
    for plan in ("free", "basic", "free", "pro", "free", "pro"):
        await meter.set_plan("u1", plan, note="flip")
    bal = await meter.balance("u1")
    assert bal.monthly_remaining == 250_000 - 48_000  # the month's use survives every flip
    await conservation(meter, "u1")


async def test_the_next_month_grants_the_full_allowance_again(meter: Meter, clock: FakeClock) -> None:
    await meter.open_account("u1")
    await meter.set_plan("u1", "pro")
    for _ in range(25):
        await meter.debit("u1", 8_000)
    await meter.set_plan("u1", "free")
    clock.set(month_end_ms(month_index(clock.now_ms())))  # a new month on free: its 10,000
    assert (await meter.balance("u1")).monthly_remaining == 10_000
    await meter.debit("u1", 1_000)
    up = await meter.set_plan("u1", "pro")  # this month used 1,000 only
    assert up.tokens == 250_000 - 1_000 - 9_000 and (await meter.balance("u1")).monthly_remaining == 249_000
    await conservation(meter, "u1")
