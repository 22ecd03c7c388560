"""Admin API (service key with the `admin` scope): API keys and token grants. Every change to a
balance is a journal entry naming who made it and why."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path
from pydantic import BaseModel, Field
from sqlalchemy import or_, select

from api.deps import mark_api_key_revoked, require_scope
from api.errors import error_body, field_names
from api.fields import StrictInt
from api.routes.plans import change_plan
from api.security import Principal, hash_api_key, new_api_key
from api.state import AppState, app_state
from meter import CREDIT_KINDS
from persistence.models import Account, ApiKey, PromoCode, utcnow

router = APIRouter(prefix="/api/v1/admin", tags=["admin"])

admin = require_scope("admin")
log = logging.getLogger("tokenmeter.api")


class KeyIn(BaseModel):
    name: str = Field(min_length=1, max_length=128, examples=["edge-gateway"])
    scopes: list[str] = Field(default=["meter"], examples=[["meter"]])


@router.post("/api-keys", status_code=201, summary="Create a service key (shown once, stored hashed)")
async def create_key(body: KeyIn, who: Principal = Depends(admin), state: AppState = Depends(app_state)
                     ) -> dict[str, Any]:
    scopes = sorted(set(body.scopes))
    if not scopes or not set(scopes) <= {"meter", "admin"}:
        raise HTTPException(422, detail=error_body("invalid_input", "scopes: a list of meter, admin", field="scopes"))
    key_id, key = new_api_key()
    async with state.rt.db.sessions() as session, session.begin():
        session.add(ApiKey(id=key_id, name=body.name, key_hash=hash_api_key(key), scopes=",".join(scopes),
                           created_by=who.subject))
    return {"id": key_id, "name": body.name, "scopes": scopes, "key": key}


@router.get("/api-keys", summary="List service keys (never the secrets)")
async def list_keys(_: Principal = Depends(admin), state: AppState = Depends(app_state)) -> list[dict[str, Any]]:
    async with state.rt.db.sessions() as session:
        rows = (await session.execute(select(ApiKey).order_by(ApiKey.created_at))).scalars()
        return [{"id": r.id, "name": r.name, "scopes": r.scopes.split(","), "created_by": r.created_by,
                 "revoked": r.revoked_at is not None} for r in rows]


@router.delete("/api-keys/{key_id}",
               summary="Revoke a key (effective within the key cache time; at once for cached verdicts)")
async def revoke_key(key_id: Annotated[str, Path(pattern=r"^[0-9a-f]{1,32}$")], _: Principal = Depends(admin),
                     state: AppState = Depends(app_state)
                     ) -> dict[str, Any]:
    async with state.rt.db.sessions() as session, session.begin():
        row = await session.get(ApiKey, key_id)
        if row is None:
            raise HTTPException(404, detail=error_body("not_found", f"no API key {key_id!r}"))
        row.revoked_at = utcnow()
    state.key_cache.clear()  # this process stops accepting it at once; others within the cache time
    try:  # and others at once too while they serve cached verdicts during a database outage
        await mark_api_key_revoked(state.rt.redis, key_id, prefix=state.rt.settings.key_prefix,
                                   ttl_s=state.rt.settings.api_key_stale_s)
    except Exception as exc:
        log.warning("revoked %s, but could not write its revocation marker to Redis: %s", key_id, exc)
    return {"id": key_id, "revoked": True}


class GrantIn(BaseModel):
    tokens: StrictInt = Field(gt=0, examples=[5000])
    bucket: str = Field(default="bonus", pattern="^(bonus|premium)$")
    kind: str = Field(default="grant", examples=["grant"])
    reason: str = Field(min_length=1, max_length=300, examples=["support: outage credit"])


@router.post("/accounts/{account_id}/grants", summary="Credit tokens to an account, journaled with who and why")
async def grant(account_id: str, body: GrantIn, who: Principal = Depends(admin),
                state: AppState = Depends(app_state)) -> dict[str, Any]:
    if body.kind not in CREDIT_KINDS:
        raise HTTPException(422, detail=error_body("invalid_input", f"kind: one of {list(CREDIT_KINDS)}", field="kind"))
    with field_names(note="reason"):
        r = await state.rt.meter.credit(account_id, body.tokens, bucket=body.bucket, kind=body.kind,
                                        note=body.reason, reference=f"admin:{who.subject}")
    return {"transaction_id": r.transaction_id, "tokens": r.tokens, "remaining_tokens": r.remaining}


class AdjustIn(BaseModel):
    tokens: StrictInt = Field(gt=0, examples=[1000])
    bucket: str = Field(default="any", pattern="^(bonus|premium|any)$")
    reason: str = Field(min_length=1, max_length=300)


@router.post("/accounts/{account_id}/adjustments", summary="Take tokens back (never below zero; the rest is owed)")
async def adjust(account_id: str, body: AdjustIn, who: Principal = Depends(admin),
                 state: AppState = Depends(app_state)) -> dict[str, Any]:
    with field_names(note="reason"):
        r = await state.rt.meter.adjust(account_id, body.tokens, bucket=body.bucket, kind="adjustment",
                                        note=body.reason, reference=f"admin:{who.subject}")
    return {"transaction_id": r.transaction_id or None, "taken_tokens": r.tokens, "owed_tokens": r.uncollected,
            "remaining_tokens": r.remaining}


class RefundIn(BaseModel):
    tokens: StrictInt = Field(gt=0, examples=[3500])
    reason: str = Field(min_length=1, max_length=300, examples=["agent run failed"])


@router.post("/accounts/{account_id}/refunds", summary="Give tokens back to a user (e.g. a failed run)")
async def refund(account_id: str, body: RefundIn, who: Principal = Depends(admin),
                 state: AppState = Depends(app_state)) -> dict[str, Any]:
    with field_names(note="reason"):
        r = await state.rt.meter.credit(account_id, body.tokens, bucket="bonus", kind="refund", note=body.reason,
                                        reference=f"admin:{who.subject}")
    return {"transaction_id": r.transaction_id, "tokens": r.tokens, "remaining_tokens": r.remaining}


class PlanIn(BaseModel):
    plan: str = Field(max_length=32, examples=["pro"])
    reason: str = Field(min_length=1, max_length=300)


@router.post("/accounts/{account_id}/plan", summary="Set an account's plan (upgrades now, downgrades next period)")
async def set_plan(account_id: str, body: PlanIn, who: Principal = Depends(admin),
                   state: AppState = Depends(app_state)) -> dict[str, Any]:
    with field_names(note="reason"):
        return await change_plan(state.rt.meter, state.rt.db, account_id, body.plan,
                                 f"admin:{who.subject}: {body.reason}")


@router.get("/accounts", summary="List and search accounts (by id or email prefix)")
async def list_accounts(q: str | None = None, limit: int = 50, _: Principal = Depends(admin),
                        state: AppState = Depends(app_state)) -> list[dict[str, Any]]:
    limit = max(1, min(limit, 500))
    query = select(Account).order_by(Account.created_at.desc()).limit(limit)
    if q:
        like = q.replace("%", "").replace("_", "") + "%"
        query = query.where(or_(Account.id.like(like), Account.email.like(like.lower())))
    async with state.rt.db.sessions() as session:
        rows = list((await session.execute(query)).scalars())
    return [{"id": r.id, "email": r.email, "plan": r.plan, "created_at": r.created_at.isoformat()} for r in rows]


class PromoIn(BaseModel):
    code: str = Field(min_length=3, max_length=64, pattern=r"^[A-Za-z0-9_-]+$", examples=["DIWALI25"])
    bonus_tokens: StrictInt = Field(gt=0, lt=2**53, examples=[25_000])
    starts_at: datetime | None = None
    ends_at: datetime | None = None
    max_redemptions: StrictInt | None = Field(default=None, gt=0, lt=2**53,
                                              description="global cap; none = unlimited")
    plan: str | None = Field(default=None, max_length=32, description="only accounts on this plan")


@router.post("/promo-codes", status_code=201, summary="Create a promo code (each account redeems it once)")
async def create_promo(body: PromoIn, _: Principal = Depends(admin), state: AppState = Depends(app_state)
                       ) -> dict[str, Any]:
    if body.plan is not None:
        state.rt.catalog.plan(body.plan)  # 422 for an unknown plan
    if body.starts_at and body.ends_at and body.ends_at <= body.starts_at:
        raise HTTPException(422, detail=error_body("invalid_input", "ends_at: must be after starts_at",
                                                   field="ends_at"))
    code = body.code.upper()
    async with state.rt.db.sessions() as session, session.begin():
        if await session.get(PromoCode, code) is not None:
            raise HTTPException(409, detail=error_body("code_exists", f"promo code {code!r} exists", field="code"))
        session.add(PromoCode(code=code, bonus_tokens=body.bonus_tokens, starts_at=body.starts_at,
                              ends_at=body.ends_at, max_redemptions=body.max_redemptions, redemptions=0,
                              plan=body.plan, active=True))
    return {"code": code, "bonus_tokens": body.bonus_tokens, "max_redemptions": body.max_redemptions,
            "active": True}


@router.delete("/promo-codes/{code}", summary="Disable a promo code")
async def disable_promo(code: Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$")],
                        _: Principal = Depends(admin), state: AppState = Depends(app_state)
                        ) -> dict[str, Any]:
    async with state.rt.db.sessions() as session, session.begin():
        row = await session.get(PromoCode, code.upper())
        if row is None:
            raise HTTPException(404, detail=error_body("not_found", f"no promo code {code!r}"))
        row.active = False
        return {"code": row.code, "active": False, "redemptions": row.redemptions}
