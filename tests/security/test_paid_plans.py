"""Finding 1: a paid plan is bought, never granted by asking. `POST /plans/subscribe` to a paid
plan answers a pending plan purchase (201); the plan changes only when the provider reports the
payment, exactly once; a failed payment changes nothing; a refund takes the plan back; a renewal
is a new purchase for the next period, and a plan nobody renews ends at the period boundary."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from sqlalchemy import select

from api.plan_billing import enforce_paid_periods
from api.security import issue_token
from meter import FakeClock
from meter._clock import month_end_ms, month_index
from persistence.models import PaymentEvent, TokenPurchase
from tests.api.conftest import Api
from tests.api.test_purchases import complete, deliver, rzp, rzp_body, testpay

pytestmark = pytest.mark.redis
__all__ = ["rzp", "testpay"]  # the fixtures, imported for pytest

SUBSCRIBE = "/api/v1/plans/subscribe"
PRO_PAISE, BASIC_PAISE = 99_900, 29_900
START_MS = 1_767_225_600_000 + 10 * 86_400_000  # 2026-01-11, a fake clock's start


async def user_at(api: Api, clock: FakeClock | None = None) -> tuple[str, dict[str, str]]:
    """A fresh free account (10,000 monthly tokens), opened on the meter's clock."""
    if clock is not None:
        api.state.rt.meter.clock = clock
    account = f"u_{uuid.uuid4().hex[:16]}"
    await api.add_account_row(account)  # user tokens of accounts without a row are refused
    await api.state.rt.meter.open_account(account, plan="free")
    return account, {"Authorization": f"Bearer {issue_token(api.state.jwt_secret, account, 3600)}"}


async def subscribe(api: Api, auth: dict[str, str], plan: str, key: str | None = None) -> Any:
    return await api.client.post(SUBSCRIBE, json={"plan": plan},
                                 headers={**auth, **({"Idempotency-Key": key} if key else {})})


async def pay(api: Api, purchase: dict[str, Any], status: str = "paid", **more: Any) -> Any:
    """Complete the test checkout as the frontend would: its body, signed."""
    return await complete(api, {**purchase["checkout"]["body"], "status": status, **more})


async def plan_of(api: Api, account: str) -> tuple[str, int, int, str]:
    b = await api.state.rt.meter.balance(account)
    return b.plan, b.monthly_allowance, b.daily_request_limit, b.pending_plan


async def test_a_paid_plan_is_granted_only_by_its_payment_and_once(testpay: Api) -> None:
    account, auth = await user_at(testpay)
    r = await subscribe(testpay, auth, "pro")
    assert r.status_code == 201, r.text
    out = r.json()
    period = month_index(testpay.state.rt.meter.clock.now_ms())
    assert (out["kind"], out["plan"], out["amount"], out["currency"], out["status"], out["provider"]) == (
        "plan", "pro", PRO_PAISE, "INR", "pending", "test")
    assert out["period"] == f"{period // 12:04d}-{period % 12 + 1:02d}"
    assert out["checkout"]["body"]["amount"] == PRO_PAISE
    assert await plan_of(testpay, account) == ("free", 10_000, 100, "")  # nothing until it is paid

    paid = await pay(testpay, out)
    assert paid.status_code == 200, paid.text
    assert (paid.json()["outcome"], paid.json()["plan"], paid.json()["effective"]) == ("plan_applied", "pro", "now")
    # Pro now, for this period only: not renewed, it lapses to free at the boundary.
    assert await plan_of(testpay, account) == ("pro", 250_000, 5_000, "free")
    assert (await testpay.state.rt.meter.balance(account)).monthly_remaining == 250_000
    again = await pay(testpay, out)
    assert again.status_code == 409  # the same payment replayed: nothing changes
    async with testpay.state.rt.db.sessions() as session:
        row = (await session.execute(select(TokenPurchase).where(TokenPurchase.id == out["purchase_id"]))).scalar_one()
        events = list((await session.execute(select(PaymentEvent).where(
            PaymentEvent.purchase_id == row.id))).scalars())
    assert (row.kind, row.plan_id, row.period, row.status, row.previous_plan) == ("plan", "pro", period, "paid", "free")
    assert row.credit_transaction_id == paid.json()["transaction_id"]
    assert [e.outcome for e in events] == ["plan_applied"]
    assert (await subscribe(testpay, auth, "pro")).status_code == 201  # pro again: next period's renewal
    listed = (await testpay.client.get("/api/v1/tokens/purchases", headers=auth)).json()
    assert sorted(p["kind"] for p in listed) == ["plan", "plan"]


async def test_idempotency_key_and_unknown_plan(testpay: Api) -> None:
    _, auth = await user_at(testpay)
    first = await subscribe(testpay, auth, "basic", key="plan-1")
    again = await subscribe(testpay, auth, "basic", key="plan-1")
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["purchase_id"] == first.json()["purchase_id"] and again.json()["replayed"] is True
    other = await subscribe(testpay, auth, "pro", key="plan-1")
    assert other.status_code == 409 and other.json()["error"] == "idempotency_conflict"
    bad = await subscribe(testpay, auth, "gold")
    assert bad.status_code == 422 and bad.json()["field"] == "plan"


async def test_a_failed_payment_leaves_the_plan(testpay: Api) -> None:
    account, auth = await user_at(testpay)
    out = (await subscribe(testpay, auth, "basic")).json()
    failed = await pay(testpay, out, "failed")
    assert failed.status_code == 200 and failed.json()["outcome"] == "failed"
    assert await plan_of(testpay, account) == ("free", 10_000, 100, "")


async def test_a_refund_takes_the_plan_back(testpay: Api) -> None:
    account, auth = await user_at(testpay)
    basic = (await subscribe(testpay, auth, "basic")).json()
    assert (await pay(testpay, basic)).status_code == 200
    pro = (await subscribe(testpay, auth, "pro")).json()
    assert (await pay(testpay, pro)).status_code == 200
    assert (await plan_of(testpay, account))[:2] == ("pro", 250_000)
    refund = await pay(testpay, pro, "refunded", refund_id="rfnd_pro", refunded_amount=PRO_PAISE // 2)
    assert refund.status_code == 200, refund.text
    assert (refund.json()["plan_reverted"], refund.json()["plan"]) == (True, "basic")  # the plan paid before
    assert await plan_of(testpay, account) == ("basic", 50_000, 1_000, "free")
    rest = await pay(testpay, pro, "refunded", refund_id="rfnd_pro_2", refunded_amount=PRO_PAISE // 2)
    assert rest.status_code == 200 and rest.json()["plan_reverted"] is False, rest.text  # the money adds up
    assert await plan_of(testpay, account) == ("basic", 50_000, 1_000, "free")
    refund = await pay(testpay, basic, "refunded", refund_id="rfnd_basic", refunded_amount=BASIC_PAISE)
    assert refund.status_code == 200 and refund.json()["plan"] == "free"
    assert (await plan_of(testpay, account))[:2] == ("free", 10_000)


async def test_buy_spend_refund_buy_again_grants_the_month_once(testpay: Api) -> None:
    """The attack: buy pro, spend most of it, get refunded, buy pro again the same month. The
    second purchase gets what this month's pro allowance has left, not another 250,000."""
    account, auth = await user_at(testpay)
    first = (await subscribe(testpay, auth, "pro")).json()
    assert (await pay(testpay, first)).status_code == 200
    meter = testpay.state.rt.meter
    for _ in range(25):
        assert (await meter.debit(account, 8_000)).allowed  # 200,000 of the month's 250,000
    refund = await pay(testpay, first, "refunded", refund_id="rfnd_1", refunded_amount=PRO_PAISE)
    assert refund.status_code == 200 and refund.json()["plan"] == "free", refund.text
    assert (await meter.balance(account)).monthly_remaining == 0
    second = (await subscribe(testpay, auth, "pro")).json()
    assert (await pay(testpay, second)).status_code == 200
    bal = await meter.balance(account)
    assert (bal.plan, bal.monthly_remaining) == ("pro", 50_000)  # was 240,000 before 'mg'


async def test_renewal_each_period_and_a_lapse_without_it(testpay: Api) -> None:
    clock = FakeClock(START_MS)
    account, auth = await user_at(testpay, clock)
    assert (await pay(testpay, (await subscribe(testpay, auth, "basic")).json())).status_code == 200
    renewal = await subscribe(testpay, auth, "basic")
    assert renewal.status_code == 201 and renewal.json()["period"] == "2026-02"
    assert (await subscribe(testpay, auth, "pro")).json()["period"] == "2026-01"  # bigger: an upgrade, now
    paid = await pay(testpay, renewal.json())
    assert (paid.json()["effective"], paid.json()["next_period_plan"]) == ("next_period", "basic")
    assert await plan_of(testpay, account) == ("basic", 50_000, 1_000, "basic")
    dup = await subscribe(testpay, auth, "pro")
    assert dup.status_code == 201  # an upgrade for January is still possible
    assert (await subscribe(testpay, auth, "basic")).status_code == 409  # February is paid for

    clock.set(month_end_ms(month_index(START_MS)))  # February: the renewal keeps basic
    assert await plan_of(testpay, account) == ("basic", 50_000, 1_000, "")
    assert account in await enforce_paid_periods(testpay.state.rt)  # not renewed for March: lapse scheduled
    assert await plan_of(testpay, account) == ("basic", 50_000, 1_000, "free")
    assert account not in await enforce_paid_periods(testpay.state.rt)  # idempotent

    clock.set(month_end_ms(month_index(START_MS) + 1))  # March, unpaid: free
    assert await plan_of(testpay, account) == ("free", 10_000, 100, "")
    assert account not in await enforce_paid_periods(testpay.state.rt)


async def test_a_period_nobody_paid_is_lapsed_now(testpay: Api) -> None:
    """Even when no sweep ran in the paid period (downtime across a boundary), the first sweep in
    an unpaid period moves the account back to free."""
    clock = FakeClock(START_MS)
    account, auth = await user_at(testpay, clock)
    assert (await pay(testpay, (await subscribe(testpay, auth, "pro")).json())).status_code == 200
    assert (await pay(testpay, (await subscribe(testpay, auth, "pro")).json())).status_code == 200  # February
    clock.set(month_end_ms(month_index(START_MS) + 1))  # March: nothing scheduled the lapse
    assert (await plan_of(testpay, account))[0] == "pro"
    assert account in await enforce_paid_periods(testpay.state.rt)
    assert await plan_of(testpay, account) == ("free", 10_000, 100, "")


async def test_admin_plans_need_no_payment_and_are_not_lapsed(testpay: Api) -> None:
    clock = FakeClock(START_MS)
    account, auth = await user_at(testpay, clock)
    assert (await pay(testpay, (await subscribe(testpay, auth, "basic")).json())).status_code == 200
    r = await testpay.client.post(f"/api/v1/admin/accounts/{account}/plan", headers=testpay.service(),
                                  json={"plan": "pro", "reason": "sales deal"})
    assert r.status_code == 200 and r.json()["effective"] == "now"
    clock.set(month_end_ms(month_index(START_MS) + 2))
    await enforce_paid_periods(testpay.state.rt)
    assert (await plan_of(testpay, account))[0] == "pro"


async def test_free_and_cancel_need_no_payment(testpay: Api) -> None:
    _, auth = await user_at(testpay)
    assert (await pay(testpay, (await subscribe(testpay, auth, "pro")).json())).status_code == 200
    r = await testpay.client.post("/api/v1/plans/cancel", headers=auth)
    assert r.status_code == 200 and (r.json()["plan"], r.json()["pending_plan"]) == ("pro", "free")
    r = await subscribe(testpay, auth, "free")
    assert r.status_code == 200 and r.json()["effective"] == "next_period"


async def test_a_razorpay_capture_of_a_plan_purchase(rzp: Api) -> None:
    account, auth = await user_at(rzp)
    out = (await subscribe(rzp, auth, "pro")).json()
    assert out["checkout"]["amount"] == PRO_PAISE and out["order_id"].startswith("order_")
    body = rzp_body("payment.captured", out["order_id"], "pay_plan1", amount=PRO_PAISE)
    first = await deliver(rzp, body, event_id="evt_plan1")
    assert first.status_code == 200 and first.json()["outcome"] == "plan_applied", first.text
    assert (await deliver(rzp, body, event_id="evt_plan1")).status_code == 409
    assert (await plan_of(rzp, account))[:2] == ("pro", 250_000)
    assert json.loads(body)["payload"]["payment"]["entity"]["amount"] == PRO_PAISE


async def test_concurrent_deliveries_apply_the_plan_once(testpay: Api) -> None:
    account, auth = await user_at(testpay)
    await testpay.state.rt.meter.debit(account, 4_000)
    out = (await subscribe(testpay, auth, "pro")).json()
    answers = await asyncio.gather(*(pay(testpay, out) for _ in range(5)))
    assert sorted(r.status_code for r in answers) == [200, 409, 409, 409, 409]
    b = await testpay.state.rt.meter.balance(account)
    assert (b.plan, b.monthly_remaining) == ("pro", 250_000 - 4_000)  # this month's use still counts
    await testpay.flush()
    items = (await testpay.client.get("/api/v1/tokens/transactions?limit=100", headers=auth)).json()
    assert sum(1 for i in items if "plan pro now" in (i["description"] or "")) == 1
