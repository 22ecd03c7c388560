"""Registration and login: users get JWTs; a new account gets its plan's monthly tokens.

Emails are normalized (api.credentials) before they are stored or looked up; registrations are
limited per client address and overall, failed logins per account and per address
(api.auth_limits); passwords are hashed off the event loop (api.hashing)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, BeforeValidator, Field
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from api.credentials import MIN_PASSWORD_LENGTH, normalize_email, password_problem
from api.errors import error_body
from api.security import issue_token
from api.state import AppState, app_state
from persistence.models import Account

router = APIRouter(prefix="/api/v1/auth", tags=["auth"])

EMAIL = r"^[^@\s]{1,64}@[^@\s]{1,255}\.[^@\s]{1,63}$"


def _normalized(value: Any) -> Any:
    return normalize_email(value) if isinstance(value, str) else value  # non-strings: the str check names them


Email = Annotated[str, BeforeValidator(_normalized), Field(pattern=EMAIL, max_length=320,
                                                            examples=["asha@example.com"])]


class Credentials(BaseModel):
    """Login: any password up to the maximum (accounts made under older rules still log in)."""

    email: Email
    password: str = Field(min_length=1, max_length=256, examples=["correct horse battery"])


class Registration(BaseModel):
    email: Email
    password: str = Field(min_length=MIN_PASSWORD_LENGTH, max_length=256, examples=["correct horse battery"],
                          description=f"at least {MIN_PASSWORD_LENGTH} characters, not a common password")


class TokenOut(BaseModel):
    user_id: str
    access_token: str
    token_type: str = "bearer"


def _check_password(body: Registration) -> None:
    problem = password_problem(body.password, body.email)
    if problem:
        raise RequestValidationError([{"type": "weak_password", "loc": ("body", "password"), "msg": problem,
                                       "input": None}])


@router.post("/register", status_code=201, response_model=TokenOut,
             responses={422: {"description": "invalid email, or a weak password (`field`: password)"},
                        429: {"description": "too many registrations from this address, or overall"}},
             summary="Create a user on the free plan (10,000 tokens this month) and return a token")
async def register(body: Registration, request: Request, state: AppState = Depends(app_state)) -> TokenOut:
    rt, auth = state.rt, state.auth
    _check_password(body)  # a refused password costs no registration slot
    await auth.limits.check_registration(auth.addresses.of(request))
    account_id = f"u_{uuid.uuid4().hex[:20]}"
    password_hash = await auth.hasher.hash(body.password)
    try:
        async with rt.db.sessions() as session, session.begin():
            session.add(Account(id=account_id, email=body.email, password_hash=password_hash, plan="free",
                                is_admin=False))
    except IntegrityError:
        raise HTTPException(409, detail=error_body("email_taken", "an account with this email exists",
                                                   field="email")) from None
    await rt.meter.open_account(account_id, plan="free")  # the welcome transaction
    return TokenOut(user_id=account_id,
                    access_token=issue_token(state.jwt_secret, account_id, rt.settings.jwt_ttl_s))


@router.post("/login", response_model=TokenOut, summary="Exchange email and password for a token",
             responses={429: {"description": "too many failed logins for this account or from this address"}})
async def login(body: Credentials, request: Request, state: AppState = Depends(app_state)) -> TokenOut:
    auth = state.auth
    attempt = await auth.limits.begin_login(body.email, auth.addresses.of(request))
    async with state.rt.db.sessions() as session:
        account = (await session.execute(
            select(Account).where(Account.email == body.email))).scalar_one_or_none()
    # An unknown email is checked against a dummy hash: it costs what a wrong password costs.
    if not await auth.hasher.verify(body.password, account.password_hash if account else None) \
            or account is None:
        await auth.limits.login_failed(attempt)
        raise HTTPException(401, detail=error_body("unauthorized", "wrong email or password"))
    await auth.limits.login_succeeded(attempt)
    return TokenOut(user_id=account.id,
                    access_token=issue_token(state.jwt_secret, account.id, state.rt.settings.jwt_ttl_s))
