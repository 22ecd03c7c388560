"""Monthly plans: subscribe (an upgrade applies at once, a downgrade at the next period) and
cancel (back to free at the next period). Limits and allowances come from the catalog."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from api.deps import current_user
from api.state import AppState, app_state
from meter import Meter
from persistence.db import Database
from persistence.models import Account

router = APIRouter(prefix="/api/v1/plans", tags=["plans"])


class SubscribeIn(BaseModel):
    plan: str = Field(max_length=32, examples=["pro"])


async def change_plan(meter: Meter, db: Database, account_id: str, plan: str, note: str) -> dict[str, Any]:
    """Upgrade (more monthly tokens) now; downgrade or same-size change at the next period."""
    target = meter.catalog.plan(plan)  # InvalidInput (422) for an unknown plan
    current = await meter.balance(account_id)
    upgrade = target.monthly_tokens > current.monthly_allowance
    receipt = await meter.set_plan(account_id, target.id, when="now" if upgrade else "next", note=note)
    async with db.sessions() as session, session.begin():
        row = await session.get(Account, account_id)
        if row is not None:
            row.plan = target.id
    after = await meter.balance(account_id)
    return {"plan": after.plan, "effective": "now" if upgrade else "next_period",
            "pending_plan": after.pending_plan or None, "monthly_allowance": after.monthly_allowance,
            "monthly_remaining": after.monthly_remaining, "monthly_change": receipt.tokens,
            "month_reset_date": after.month_reset_date, "transaction_id": receipt.transaction_id}


@router.post("/subscribe", summary="Move to a plan: upgrades apply now, downgrades at the next period")
async def subscribe(body: SubscribeIn, account_id: str = Depends(current_user),
                    state: AppState = Depends(app_state)) -> dict[str, Any]:
    return await change_plan(state.rt.meter, state.rt.db, account_id, body.plan, f"subscribe by {account_id}")


@router.post("/cancel", summary="Cancel the paid plan: back to free at the next period")
async def cancel(account_id: str = Depends(current_user), state: AppState = Depends(app_state)) -> dict[str, Any]:
    return await change_plan(state.rt.meter, state.rt.db, account_id, "free", f"cancel by {account_id}")
