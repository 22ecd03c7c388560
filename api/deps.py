"""Request dependencies: who is calling (user token or service key) and what they may do."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable

from fastapi import Depends, Header, HTTPException, Request
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from api.errors import error_body
from api.security import Principal, hash_api_key, read_token
from api.state import AppState, app_state
from meter import StoreUnavailable
from meter import keys as keyspace
from persistence.db import is_transient
from persistence.models import Account, ApiKey

__all__ = [
    "authenticate_service", "authorize", "current_user", "mark_api_key_revoked", "require_scope",
    "service_principal", "service_with_scope", "with_scope",
]

log = logging.getLogger("tokenmeter.api")
_KEY_OUTAGE_HOLD_S = 1.0  # during a database outage: one lookup attempt per key per second
_WARN_EVERY_S = 10.0
_last_warning = 0.0


def _bearer(authorization: str | None) -> str | None:
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return None


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(401, detail={"error": "unauthorized", "message": detail},
                         headers={"WWW-Authenticate": "Bearer"})


async def current_user(request: Request, authorization: str | None = Header(default=None),
                       state: AppState = Depends(app_state)) -> str:
    """The account id of the user token (JWT) in `Authorization: Bearer ...`."""
    token = _bearer(authorization)
    if not token:
        raise _unauthorized("missing bearer token")
    account_id = read_token(state.jwt_secret, token)
    if account_id is None:
        raise _unauthorized("invalid or expired token")
    if account_id not in state.auth.accounts:  # a token outlives a deleted account: check, briefly cached
        try:
            async with state.rt.db.sessions() as session:
                exists = (await session.execute(select(Account.id).where(Account.id == account_id))).first()
        except (SQLAlchemyError, OSError) as exc:
            raise HTTPException(503, headers={"Retry-After": "1"}, detail={
                "error": "database_unavailable", "message": "cannot check the account now"}) from exc
        if exists is None:
            raise _unauthorized("the account of this token no longer exists")
        state.auth.accounts.add(account_id)
    return account_id


async def service_principal(request: Request, authorization: str | None = Header(default=None),
                            x_api_key: str | None = Header(default=None),
                            state: AppState = Depends(app_state)) -> Principal:
    """The service key in `Authorization: Bearer <key>` or `X-API-Key`."""
    return await authenticate_service(state, _bearer(authorization) or x_api_key)


async def service_with_scope(request: Request, scope: str) -> Principal:
    """The hot path's check, without FastAPI's dependency machinery: the key from the headers,
    verified (cached), with `scope`."""
    headers = request.headers
    return await authorize(request.app.state.tm, headers.get("authorization"), headers.get("x-api-key"), scope)


async def authorize(state: AppState, authorization: str | None, x_api_key: str | None, scope: str) -> Principal:
    """The service key of `Authorization: Bearer <key>` (or `X-API-Key`), verified, with `scope`."""
    return with_scope(await authenticate_service(state, _bearer(authorization) or x_api_key), scope)


def with_scope(principal: Principal, scope: str) -> Principal:
    """The one scope check: the principal, or 403 naming the missing scope."""
    if scope not in principal.scopes:
        raise HTTPException(403, detail={"error": "forbidden", "message": f"this key lacks the '{scope}' scope"})
    return principal


async def authenticate_service(state: AppState, key: str | None) -> Principal:
    if not key:
        raise _unauthorized("missing API key")
    master = state.rt.settings.master_key
    if master and hmac.compare_digest(key.encode(), master.encode()):
        return Principal("service", "master", frozenset({"meter", "admin"}))
    digest = hash_api_key(key)
    hit, principal = state.key_cache.get(digest)
    if not hit:
        try:
            principal = await asyncio.wait_for(_lookup(state, key, digest),
                                               state.rt.settings.api_key_lookup_timeout_s)
        except Exception as exc:  # the database cannot answer: the last known verdict, or 503
            principal = await _last_verdict(state, digest, exc)
        else:
            state.key_cache.put(digest, principal)
    if principal is None:
        raise _unauthorized("invalid or revoked API key")
    return principal


async def _last_verdict(state: AppState, digest: str, exc: Exception) -> Principal | None:
    """While the database is down the hot path keeps working: a key verified within
    api_key_stale_s keeps its verdict unless a revocation marker for it is in Redis; a key not
    seen recently gets a JSON 503 `ledger_unavailable` (never a plain 500)."""
    _warn_outage(exc)
    stale, principal = state.key_cache.get_stale(digest)
    if not stale:
        raise HTTPException(503, headers={"Retry-After": "1"}, detail=error_body(
            "ledger_unavailable", "the key database is unreachable and this key was not verified recently; "
                                  "retry shortly"))
    if principal is not None and principal.subject != "master":
        marker = keyspace.revoked_api_key_key(principal.subject, state.rt.settings.key_prefix)
        try:
            revoked = bool(await state.rt.redis.exists(marker))
        except (redis_errors.RedisError, OSError) as rexc:
            raise StoreUnavailable(f"cannot check the key's revocation: {rexc}") from rexc
        if revoked:
            state.key_cache.put(digest, None)
            return None
    state.key_cache.hold(digest, _KEY_OUTAGE_HOLD_S)
    return principal


def _warn_outage(exc: Exception) -> None:
    """One log line per interval during an outage (not a traceback per request)."""
    global _last_warning
    now = time.monotonic()
    if now - _last_warning < _WARN_EVERY_S:
        return
    _last_warning = now
    if is_transient(exc) or isinstance(exc, TimeoutError):
        log.warning("API key lookup: database unavailable (%s: %s); serving last known verdicts",
                    type(exc).__name__, exc)
    else:
        log.error("API key lookup failed; serving last known verdicts", exc_info=exc)


async def mark_api_key_revoked(redis: Redis, key_id: str, *, prefix: str, ttl_s: float) -> None:
    """Tell every process that `key_id` is revoked, for as long as they may serve a cached
    verdict without the database (api_key_stale_s)."""
    await redis.set(keyspace.revoked_api_key_key(key_id, prefix), "1", ex=max(int(ttl_s), 1))


async def _lookup(state: AppState, key: str, digest: str) -> Principal | None:
    if not key.startswith("tmk_"):
        return None
    async with state.rt.db.sessions() as session:
        row = (await session.execute(select(ApiKey).where(ApiKey.key_hash == digest))).scalar_one_or_none()
    if row is None or row.revoked_at is not None:
        return None
    return Principal("service", row.id, frozenset(s for s in row.scopes.split(",") if s))


def require_scope(scope: str) -> Callable[..., Awaitable[Principal]]:
    """FastAPI dependency: the service key's principal, with `scope` (see `with_scope`)."""
    async def check(principal: Principal = Depends(service_principal)) -> Principal:
        return with_scope(principal, scope)

    return check
