"""Paid plans, period by period. A paid plan is bought like a pack (a `plan` purchase for one
period, a calendar month as the meter counts them); what its payment events do to the plan:

- paid, for the current period (an upgrade): the plan applies now (`set_plan(when="now")`,
  request id `plan:<purchase>`), and the next period is scheduled: the plan paid for it, else
  free. So a plan nobody renews ends at the period boundary.
- paid, for the next period (a renewal, or a move to a smaller paid plan): the plan is scheduled
  for the boundary (`when="next"`), replacing the scheduled lapse.
- paid late (the period is over, e.g. a late Razorpay capture): applied now, for the current
  period, which is recorded on the purchase.
- refunded (the first refund of it): a plan in effect goes back now to the plan it replaced
  (`previous_plan`, else free) and the next period is scheduled again; a renewal not yet in
  effect unschedules (the next period falls back to what is paid for, else free); a past
  period changes nothing.
- failed: the plan never changed; nothing to undo.

Each plan change runs inside the payment event's database transaction, after the purchase row
moved state under its lock: that state change is the exactly-once guard, the request ids make a
retried call a replay. `enforce_paid_periods` (run by the app every TOKENMETER_PLAN_PERIOD_SWEEP_S)
schedules the lapse for accounts whose paid period is the current one with no renewal, and moves
accounts still on a paid plan with no payment for the current period back to free now.
Accounts whose plan an admin set after their last plan payment are left alone."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from api.runtime import Runtime
from meter import UnknownAccount
from meter._clock import month_index
from persistence.models import Account, TokenPurchase

__all__ = ["apply_paid", "current_period", "enforce_paid_periods", "period_label", "revert_refunded"]

log = logging.getLogger("tokenmeter.plans")


def current_period(rt: Runtime) -> int:
    return month_index(rt.meter.clock.now_ms())


def period_label(period: int) -> str:
    """A month index as YYYY-MM."""
    year, month0 = divmod(period, 12)
    return f"{year:04d}-{month0 + 1:02d}"


async def _paid_for(session: AsyncSession, account_id: str, period: int, exclude: str = "") -> TokenPurchase | None:
    """The newest paid plan purchase of the account for `period`."""
    return (await session.execute(select(TokenPurchase).where(
        TokenPurchase.account_id == account_id, TokenPurchase.kind == "plan", TokenPurchase.status == "paid",
        TokenPurchase.period == period, TokenPurchase.id != exclude).order_by(
        TokenPurchase.paid_at.desc()).limit(1))).scalar_one_or_none()


async def _schedule_next(rt: Runtime, session: AsyncSession, account_id: str, period: int, request_id: str,
                         exclude: str = "") -> str:
    """Schedule the plan of the period after `period`: the one paid for, else free (a lapse)."""
    paid = await _paid_for(session, account_id, period + 1, exclude)
    plan = paid.plan_id if paid is not None and paid.plan_id else "free"
    balance = await rt.meter.balance(account_id)
    if plan == "free" and balance.plan == "free" and not balance.pending_plan:
        return "free"
    await rt.meter.set_plan(account_id, plan, when="next", request_id=request_id,
                            note=f"{period_label(period + 1)}: {'paid plan' if paid else 'not renewed, lapses'}")
    return plan


async def _set_account_plan(session: AsyncSession, account_id: str, plan: str) -> None:
    await session.execute(update(Account).where(Account.id == account_id).values(plan=plan))


async def apply_paid(rt: Runtime, session: AsyncSession, row: TokenPurchase) -> dict[str, Any]:
    """The paid event of a plan purchase (the row is locked and just moved to paid)."""
    now = current_period(rt)
    plan = str(row.plan_id)
    period = max(row.period if row.period is not None else now, now)
    label = f"plan {plan} for {period_label(period)}: purchase {row.id}"
    if period == now:
        receipt = await rt.meter.set_plan(row.account_id, plan, when="now", note=f"paid {label}",
                                          request_id=f"plan:{row.id}")
        await _set_account_plan(session, row.account_id, plan)
        then = await _schedule_next(rt, session, row.account_id, now, f"plan-next:{row.id}")
        effective = "now"
    else:
        receipt = await rt.meter.set_plan(row.account_id, plan, when="next", note=f"renewal {label}",
                                          request_id=f"plan:{row.id}")
        then, effective = plan, "next_period"
    await session.execute(update(TokenPurchase).where(TokenPurchase.id == row.id).values(
        period=period, credit_transaction_id=receipt.transaction_id))
    row.period = period
    return {"plan": plan, "period": period_label(period), "effective": effective, "next_period_plan": then,
            "transaction_id": receipt.transaction_id}


async def revert_refunded(rt: Runtime, session: AsyncSession, row: TokenPurchase) -> dict[str, Any]:
    """The first refund of a paid plan purchase: take the plan back (see the module doc)."""
    now = current_period(rt)
    period = row.period if row.period is not None else now
    if period < now:
        return {"plan_reverted": False}
    if period == now:
        back = row.previous_plan if row.previous_plan in rt.catalog.plans else "free"
        receipt = await rt.meter.set_plan(row.account_id, str(back), when="now",
                                          note=f"refund of purchase {row.id}: back to {back}",
                                          request_id=f"planrefund:{row.id}")
        await _set_account_plan(session, row.account_id, str(back))
        then = await _schedule_next(rt, session, row.account_id, now, f"planrefund-next:{row.id}", exclude=row.id)
        return {"plan_reverted": True, "plan": back, "next_period_plan": then,
                "transaction_id": receipt.transaction_id}
    then = await _schedule_next(rt, session, row.account_id, now, f"planrefund-next:{row.id}", exclude=row.id)
    return {"plan_reverted": True, "plan": (await rt.meter.balance(row.account_id)).plan, "next_period_plan": then}


async def enforce_paid_periods(rt: Runtime) -> list[str]:
    """Lapse what is not paid for (see the module doc); returns the accounts changed. Looks
    at accounts whose last paid plan period is this one or the one before (a sweep that missed a
    whole period of downtime still catches them; older ones were lapsed by an earlier sweep)."""
    now = current_period(rt)
    paid = {p.id for p in rt.catalog.plans.values() if p.price_inr_paise > 0}
    changed: list[str] = []
    async with rt.db.sessions() as session, session.begin():
        latest = (await session.execute(select(
            TokenPurchase.account_id, func.max(TokenPurchase.period), func.max(TokenPurchase.paid_at)).where(
            TokenPurchase.kind == "plan", TokenPurchase.status == "paid").group_by(
            TokenPurchase.account_id).having(func.max(TokenPurchase.period).between(now - 1, now)))).all()
        admin_at = dict((await session.execute(select(Account.id, Account.admin_plan_at).where(
            Account.id.in_([a for a, _, _ in latest]), Account.admin_plan_at.is_not(None)))).all())
        for account_id, period, paid_at in latest:
            admin_set = admin_at.get(account_id)
            if admin_set is not None and (paid_at is None or admin_set >= paid_at):
                continue  # an admin set the plan after the last payment
            try:
                balance = await rt.meter.balance(account_id)
            except UnknownAccount:  # not in this store (nor its snapshots): nothing to lapse
                continue
            if period == now and balance.plan in paid and not balance.pending_plan:  # nothing scheduled
                await rt.meter.set_plan(account_id, "free", when="next", request_id=f"lapse:{account_id}:{now}",
                                        note=f"{period_label(now + 1)}: not renewed, lapses")
                changed.append(account_id)
            elif period is not None and period < now and balance.plan in paid:
                await rt.meter.set_plan(account_id, "free", when="now", request_id=f"lapse-now:{account_id}:{now}",
                                        note=f"{period_label(now)}: not paid for")
                await _set_account_plan(session, account_id, "free")
                changed.append(account_id)
    if changed:
        log.info("plan periods: %d accounts lapsed or scheduled to lapse", len(changed))
    return changed
