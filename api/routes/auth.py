"""Registration and login: users get JWTs; a new account gets its plan's monthly tokens."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from api.errors import error_body
from api.security import hash_password, issue_token, verify_password
from api.state import AppState, app_state
from persistence.models import Account

router = APIRouter(prefix="/api/v1/auth", tags=["auth"])

EMAIL = r"^[^@\s]{1,64}@[^@\s]{1,255}\.[^@\s]{1,63}$"


class Credentials(BaseModel):
    email: str = Field(pattern=EMAIL, max_length=320, examples=["asha@example.com"])
    password: str = Field(min_length=8, max_length=256, examples=["correct horse battery"])


class TokenOut(BaseModel):
    user_id: str
    access_token: str
    token_type: str = "bearer"


@router.post("/register", status_code=201, response_model=TokenOut,
             summary="Create a user on the free plan (10,000 tokens this month) and return a token")
async def register(body: Credentials, state: AppState = Depends(app_state)) -> TokenOut:
    rt = state.rt
    account_id = f"u_{uuid.uuid4().hex[:20]}"
    try:
        async with rt.db.sessions() as session, session.begin():
            session.add(Account(id=account_id, email=body.email.lower(),
                                password_hash=hash_password(body.password), plan="free", is_admin=False))
    except IntegrityError:
        raise HTTPException(409, detail=error_body("email_taken", "an account with this email exists",
                                                   field="email")) from None
    await rt.meter.open_account(account_id, plan="free")  # the welcome transaction
    return TokenOut(user_id=account_id,
                    access_token=issue_token(state.jwt_secret, account_id, rt.settings.jwt_ttl_s))


@router.post("/login", response_model=TokenOut, summary="Exchange email and password for a token")
async def login(body: Credentials, state: AppState = Depends(app_state)) -> TokenOut:
    async with state.rt.db.sessions() as session:
        account = (await session.execute(
            select(Account).where(Account.email == body.email.lower()))).scalar_one_or_none()
    if account is None or not verify_password(body.password, account.password_hash):
        raise HTTPException(401, detail=error_body("unauthorized", "wrong email or password"))
    return TokenOut(user_id=account.id,
                    access_token=issue_token(state.jwt_secret, account.id, state.rt.settings.jwt_ttl_s))
