"""Monthly plans. A paid plan is bought like a pack: subscribing to it starts a pending `plan`
purchase with the payment provider, and the plan changes when the payment is reported, exactly
once (`api.plan_billing`): an upgrade at once, for the current period; the same or a smaller paid
plan as the next period's renewal. Free and cancel need no payment: the move back to free
happens at the next period. Admins set any plan directly (`change_plan`), journaled as theirs.
Limits and allowances come from the catalog."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import or_, select

from api.deps import current_user
from api.errors import error_body
from api.payments import Payments
from api.plan_billing import current_period, period_label
from api.routes.purchases import IdempotencyKey, Item, start_purchase
from api.state import AppState, app_state, payments
from meter import Meter
from persistence.db import Database
from persistence.models import Account, TokenPurchase, utcnow

router = APIRouter(prefix="/api/v1/plans", tags=["plans"])


class SubscribeIn(BaseModel):
    plan: str = Field(max_length=32, examples=["pro"])


async def _move(meter: Meter, db: Database, account_id: str, plan: str, note: str, *, admin: bool
                ) -> dict[str, Any]:
    """Upgrade (more monthly tokens) now; downgrade or same-size change at the next period."""
    target = meter.catalog.plan(plan)  # InvalidInput (422) for an unknown plan
    current = await meter.balance(account_id)
    upgrade = target.monthly_tokens > current.monthly_allowance
    receipt = await meter.set_plan(account_id, target.id, when="now" if upgrade else "next", note=note)
    async with db.sessions() as session, session.begin():
        row = await session.get(Account, account_id)
        if row is not None:
            row.plan = target.id
            if admin:  # the period sweep leaves an admin's plan alone
                row.admin_plan_at = utcnow()
    after = await meter.balance(account_id)
    return {"plan": after.plan, "effective": "now" if upgrade else "next_period",
            "pending_plan": after.pending_plan or None, "monthly_allowance": after.monthly_allowance,
            "monthly_remaining": after.monthly_remaining, "monthly_change": receipt.tokens,
            "month_reset_date": after.month_reset_date, "transaction_id": receipt.transaction_id}


async def change_plan(meter: Meter, db: Database, account_id: str, plan: str, note: str) -> dict[str, Any]:
    """An admin's plan change (admin API, `tokenmeter admin set-plan`): no payment; an upgrade now,
    a downgrade at the next period; the note (who and why) is journaled."""
    return await _move(meter, db, account_id, plan, note, admin=True)


@router.post("/subscribe", summary="Move to a plan: a paid plan starts a purchase (201); free moves at the next "
                                   "period (200)",
             responses={200: {"description": "free plan (next period), or the same Idempotency-Key again"},
                        201: {"description": "a pending plan purchase with the provider's checkout"},
                        409: {"description": "that period is already paid, or the Idempotency-Key was used "
                                             "for something else"},
                        422: {"description": "unknown plan"},
                        503: {"description": "the payment provider could not create the order"}})
async def subscribe(body: SubscribeIn, idempotency_key: IdempotencyKey = None,
                    account_id: str = Depends(current_user), state: AppState = Depends(app_state),
                    pay: Payments = Depends(payments)) -> JSONResponse:
    """A paid plan with more monthly tokens than today's is an upgrade for the current period;
    the same or a smaller paid plan is the renewal for the next period. Either answers a pending
    purchase (kind "plan", the plan, the period, amount in paise, the provider's checkout); the
    plan changes only when the provider reports the payment. A paid plan that is not renewed
    ends at the period boundary (back to free)."""
    meter = state.rt.meter
    target = meter.catalog.plan(body.plan)  # InvalidInput (422) for an unknown plan
    if target.price_inr_paise == 0:
        return JSONResponse(await _move(meter, state.rt.db, account_id, target.id, f"subscribe by {account_id}",
                                        admin=False))
    current = await meter.balance(account_id)
    now = current_period(state.rt)
    period = now if target.monthly_tokens > current.monthly_allowance else now + 1
    q = select(TokenPurchase).where(TokenPurchase.account_id == account_id, TokenPurchase.kind == "plan",
                                    TokenPurchase.status == "paid", TokenPurchase.period == period).limit(1)
    if idempotency_key is not None:  # a retry of this very purchase replays it instead
        q = q.where(or_(TokenPurchase.idempotency_key.is_(None), TokenPurchase.idempotency_key != idempotency_key))
    async with state.rt.db.sessions() as session:
        paid = (await session.execute(q)).scalar_one_or_none()
    if paid is not None and (period > now or paid.plan_id == target.id):
        raise HTTPException(409, detail=error_body(
            "period_already_paid", f"{period_label(period)} is already paid for ({paid.plan_id} plan, purchase "
            f"{paid.id})", purchase_id=paid.id, field="plan"))
    item = Item("plan", target.id, 0, target.price_inr_paise, plan_id=target.id, period=period,
                previous_plan=current.plan)
    return await start_purchase(state, pay, account_id, item, idempotency_key)


@router.post("/cancel", summary="Cancel the paid plan: back to free at the next period")
async def cancel(account_id: str = Depends(current_user), state: AppState = Depends(app_state)) -> dict[str, Any]:
    return await _move(state.rt.meter, state.rt.db, account_id, "free", f"cancel by {account_id}", admin=False)
