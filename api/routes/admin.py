"""Admin API (service key with the `admin` scope): API keys and token grants. Every change to a
balance is a journal entry naming who made it and why."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, Field
from sqlalchemy import select

from api.deps import require_scope
from api.errors import error_body
from api.security import Principal, hash_api_key, new_api_key
from api.state import AppState, app_state
from meter import CREDIT_KINDS
from persistence.models import ApiKey, utcnow

router = APIRouter(prefix="/api/v1/admin", tags=["admin"])
admin = require_scope("admin")


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


@router.delete("/api-keys/{key_id}", summary="Revoke a key (effective within the key cache time)")
async def revoke_key(key_id: str, _: Principal = Depends(admin), state: AppState = Depends(app_state)
                     ) -> dict[str, Any]:
    async with state.rt.db.sessions() as session, session.begin():
        row = await session.get(ApiKey, key_id)
        if row is None:
            raise HTTPException(404, detail=error_body("not_found", f"no API key {key_id!r}"))
        row.revoked_at = utcnow()
    state.key_cache.clear()  # this process stops accepting it at once; others within the cache time
    return {"id": key_id, "revoked": True}


class GrantIn(BaseModel):
    tokens: int = Field(gt=0, examples=[5000])
    bucket: str = Field(default="bonus", pattern="^(bonus|premium)$")
    kind: str = Field(default="grant", examples=["grant"])
    reason: str = Field(min_length=1, max_length=300, examples=["support: outage credit"])


@router.post("/accounts/{account_id}/grants", summary="Credit tokens to an account, journaled with who and why")
async def grant(account_id: str, body: GrantIn, who: Principal = Depends(admin),
                state: AppState = Depends(app_state)) -> dict[str, Any]:
    if body.kind not in CREDIT_KINDS:
        raise HTTPException(422, detail=error_body("invalid_input", f"kind: one of {list(CREDIT_KINDS)}", field="kind"))
    r = await state.rt.meter.credit(account_id, body.tokens, bucket=body.bucket, kind=body.kind,
                                    note=body.reason, reference=f"admin:{who.subject}")
    return {"transaction_id": r.transaction_id, "tokens": r.tokens, "remaining_tokens": r.remaining}
