"""The user's token endpoints (JWT): balance, history, analytics, packages, purchase, promo
codes and a live balance stream. A user only ever sees their own account."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, cast

import anyio
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from redis.exceptions import RedisError
from sqlalchemy import CursorResult, select, update
from sqlalchemy.exc import IntegrityError

from api.deps import current_user
from api.errors import error_body
from api.metering import json_response, metered_headers
from api.state import AppState, app_state
from meter import StoreUnavailable
from meter import keys as keyspace
from persistence import replies
from persistence.journaled import journaled_change
from persistence.models import PromoCode, PromoRedemption, TokenTransaction

router = APIRouter(prefix="/api/v1/tokens", tags=["tokens"])

USAGE_TYPES = ("usage", "settle")


def _money(minor: int, places: int) -> Decimal:
    """Integer minor units as an exact decimal for display (2 places)."""
    return Decimal(minor).scaleb(-places).quantize(Decimal("0.01"))


@router.get("/balance", summary="Current balance (live, from Redis)")
async def balance(account_id: str = Depends(current_user), state: AppState = Depends(app_state)) -> Response:
    import time

    start = time.perf_counter()
    b = await state.rt.meter.balance(account_id)
    return json_response(200, b.as_dict(), metered_headers(b.remaining_tokens, b.tokens_used_today,
                                                           b.requests_today, start))


def _describe(row: TokenTransaction, agents: dict[str, str]) -> str:
    if row.transaction_type in USAGE_TYPES and row.agent_type:
        return f"Token usage for {agents.get(row.agent_type, row.agent_type)}"
    return row.description or row.transaction_type


@router.get("/transactions", summary="Transaction history, newest first (cursor pagination)")
async def transactions(
    account_id: str = Depends(current_user), state: AppState = Depends(app_state),
    limit: int = Query(50, ge=1, le=500), cursor: int | None = Query(None, ge=1, lt=2**63, description="X-Next-Cursor"),
    type: str | None = Query(None, max_length=20, description="usage, settle, purchase, bonus, ..."),
    agent: str | None = Query(None, max_length=64), since: datetime | None = None, until: datetime | None = None,
) -> JSONResponse:
    tx = TokenTransaction
    q = select(tx).where(tx.account_id == account_id).order_by(tx.seq.desc()).limit(limit + 1)
    if cursor is not None:  # the account's journal sequence: newest first, served by the table's key
        q = q.where(tx.seq < cursor)
    if type == "usage":  # the list shows a hold's settle as usage: the filter finds both
        q = q.where(tx.transaction_type.in_(USAGE_TYPES))
    elif type:
        q = q.where(tx.transaction_type == type)
    if agent:
        q = q.where(tx.agent_type == agent)
    if since:
        q = q.where(tx.created_at >= since)
    if until:
        q = q.where(tx.created_at < until)
    async with state.rt.db.sessions() as session:
        rows = list((await session.execute(q)).scalars())
    agents = {a.id: a.name for a in state.rt.catalog.agents.values()}
    items = [{"type": "usage" if r.transaction_type in USAGE_TYPES else r.transaction_type,
              "tokens": r.tokens_changed + r.held_changed if r.transaction_type in USAGE_TYPES else r.tokens_changed,
              "description": _describe(r, agents), "agent": r.agent_type, "model": r.model_used,
              "timestamp": r.created_at.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="seconds")
              if r.created_at.tzinfo else r.created_at.isoformat(timespec="seconds"),
              "transaction_id": r.transaction_id, "transaction_type": r.transaction_type,
              "tokens_before": r.tokens_before, "tokens_after": r.tokens_after,
              "input_tokens": r.input_tokens, "output_tokens": r.output_tokens,
              "estimated_cost_usd_micros": r.estimated_cost_usd_micros,
              "estimated_cost_inr_paise": r.estimated_cost_inr_paise, "project_id": r.project_id}
             for r in rows[:limit]]
    headers = {"X-Next-Cursor": str(rows[limit - 1].seq)} if len(rows) > limit else {}
    return JSONResponse(items, headers=headers)


@router.get("/analytics", summary="Usage analytics: totals, agent and model breakdowns, cost, per day")
async def analytics(account_id: str = Depends(current_user), state: AppState = Depends(app_state),
                    since: datetime | None = None, until: datetime | None = None) -> dict[str, Any]:
    tx = TokenTransaction
    q = select(tx.transaction_type, tx.agent_type, tx.model_used, tx.tokens_changed, tx.held_changed,
               tx.estimated_cost_usd_micros, tx.estimated_cost_inr_paise, tx.created_at).where(
        tx.account_id == account_id)
    if since:
        q = q.where(tx.created_at >= since)
    if until:
        q = q.where(tx.created_at < until)
    used = added = count = requests = usd = inr = unpriced_requests = unpriced_tokens = 0
    unpriced_models: set[str] = set()
    catalog = state.rt.catalog
    by_agent: dict[str, int] = defaultdict(int)
    by_model: dict[str, int] = defaultdict(int)
    by_day: dict[str, int] = defaultdict(int)
    async with state.rt.db.sessions() as session:
        for kind, agent, model, changed, held, cost_usd, cost_inr, at in (await session.execute(q)).all():
            count += 1
            if kind in USAGE_TYPES:
                spent = -(changed + held)
                used += spent
                requests += 1
                usd += cost_usd
                inr += cost_inr
                by_agent[agent or "other"] += spent
                by_model[model or "unspecified"] += spent
                by_day[at.date().isoformat()] += spent
                if model and not catalog.is_priced(model):  # accepted, recorded, costed 0: flagged
                    unpriced_requests += 1
                    unpriced_tokens += spent
                    unpriced_models.add(model)
            elif changed > 0 and kind not in ("release", "rollover"):
                added += changed
    return {
        "total_tokens_used": used, "total_tokens_added": added, "total_transactions": count,
        "agent_usage_breakdown": dict(by_agent), "model_usage_breakdown": dict(by_model),
        "estimated_cost": {"usd": _money(usd, 6), "inr": _money(inr, 2), "usd_micros": usd, "inr_paise": inr},
        "average_tokens_per_request": round(used / requests, 2) if requests else 0.0, "usage_requests": requests,
        "usage_per_day": dict(sorted(by_day.items())),
        "unpriced": {"requests": unpriced_requests, "tokens": unpriced_tokens, "models": sorted(unpriced_models)},
    }


@router.get("/packages", summary="Token packs and monthly plans, prices in INR and USD")
async def packages(state: AppState = Depends(app_state)) -> dict[str, Any]:
    cat = state.rt.catalog

    def usd_cents(paise: int) -> int:
        return (paise * 100 + cat.inr_paise_per_usd // 2) // cat.inr_paise_per_usd

    return {
        "packs": [{"id": p.id, "name": p.name, "tokens": p.tokens, "price_inr": _money(p.price_inr_paise, 2),
                   "price_inr_paise": p.price_inr_paise, "price_usd": _money(usd_cents(p.price_inr_paise), 2),
                   "price_usd_cents": usd_cents(p.price_inr_paise), "most_popular": p.popular}
                  for p in cat.packs.values()],
        "plans": [{"id": p.id, "name": p.name, "monthly_tokens": p.monthly_tokens,
                   "price_inr": _money(p.price_inr_paise, 2), "price_inr_paise": p.price_inr_paise,
                   "price_usd": _money(usd_cents(p.price_inr_paise), 2),
                   "price_usd_cents": usd_cents(p.price_inr_paise), "daily_requests": p.daily_requests,
                   "max_tokens_per_request": p.max_tokens_per_request, "rollover_pct": p.rollover_pct}
                  for p in cat.plans.values()],
        "usd_to_inr": _money(cat.inr_paise_per_usd, 2), "inr_paise_per_usd": cat.inr_paise_per_usd,
    }


class RedeemIn(BaseModel):
    promo_code: str = Field(min_length=1, max_length=64, examples=["WELCOME2024"])


async def _count_attempt(state: AppState, account_id: str) -> str:
    """Count this attempt BEFORE evaluating the code, in one MULTI/EXEC (INCR, EXPIRE NX, TTL):
    parallel guesses each get their own number, so at most `promo_max_failures` are evaluated per
    window however many race. Over the limit: 429 and nothing is evaluated."""
    rt = state.rt
    key = keyspace.promo_failures_key(account_id, shards=rt.settings.shards, prefix=rt.settings.key_prefix)
    async with rt.redis.pipeline(transaction=True) as pipe:
        pipe.incr(key)
        pipe.expire(key, rt.settings.promo_failure_window_s, nx=True)
        pipe.ttl(key)
        attempts, _, ttl = await pipe.execute()
    if int(attempts) > rt.settings.promo_max_failures:
        wait = max(int(ttl), 1)
        raise HTTPException(429, headers={"Retry-After": str(wait)}, detail=error_body(
            "too_many_attempts", f"too many failed promo code attempts; try again in {wait} s", retry_after_s=wait))
    return key


@router.post("/redeem-code", summary="Redeem a promo code (once per account) for bonus tokens",
             responses={404: {"description": "unknown code"}, 409: {"description": "already redeemed"},
                        410: {"description": "expired or used up"}, 429: {"description": "too many failed attempts"}})
async def redeem_code(body: RedeemIn, account_id: str = Depends(current_user),
                      state: AppState = Depends(app_state)) -> dict[str, Any]:
    """Failed attempts (unknown, expired, exhausted, wrong plan, already redeemed) count against a
    per-account limit (5 per 15 minutes by default), so codes cannot be guessed by brute force.
    Every attempt is counted before it is evaluated; a successful one is uncounted afterwards."""
    key = await _count_attempt(state, account_id)
    out = await _redeem(state, account_id, body.promo_code.strip().upper())
    # A success is not a failed attempt. (Should the window end in between, the DECR leaves -1
    # without a TTL: one extra attempt at most, and the next INCR's EXPIRE NX sets the window again.)
    await state.rt.redis.decr(key)
    return out


async def _redeem(state: AppState, account_id: str, code: str) -> dict[str, Any]:
    """Exactly once per (code, account), on the database record alone: the redemption row, the
    use of the code's cap and the wallet credit's journal id are committed in ONE transaction, so
    a row exists only for a credited redemption. A second attempt finds the row (or, racing, hits
    its unique constraint) and answers the stored result with 409, never crediting: no TTL (the
    credit's idempotency key, 24 h) is needed for it. If Redis fails the credit, everything rolls
    back and a retry starts over; if the commit fails after the credit, the retry finds the credit
    in the ledger (persistence.journaled), or, before it is flushed, replays it by request id."""
    rt = state.rt
    now = datetime.now(UTC)
    async with rt.db.sessions() as session, session.begin():
        promo = await session.get(PromoCode, code)
        if promo is None or not promo.active:
            raise HTTPException(404, detail=error_body("unknown_code", f"promo code {code!r} does not exist",
                                                       field="promo_code"))
        done = (await session.execute(select(PromoRedemption).where(
            PromoRedemption.code == code, PromoRedemption.account_id == account_id))).scalar_one_or_none()
        if done is not None:
            raise _already(code, done)
        if (promo.starts_at and _aware(promo.starts_at) > now) or (promo.ends_at and _aware(promo.ends_at) <= now):
            raise HTTPException(410, detail=error_body("code_expired", f"promo code {code!r} is not valid now",
                                                       field="promo_code"))
        if promo.plan and (await rt.meter.balance(account_id)).plan != promo.plan:
            raise HTTPException(403, detail=error_body("code_not_for_plan",
                                                       f"promo code {code!r} is for the {promo.plan} plan"))
        row = PromoRedemption(code=code, account_id=account_id, bonus_tokens=promo.bonus_tokens, created_at=now)
        session.add(row)
        try:
            await session.flush()  # waits for a concurrent redemption by the same account; fails if it won
        except IntegrityError:
            raise HTTPException(409, detail=error_body(
                "already_redeemed", f"promo code {code!r} was already redeemed")) from None
        taken = await session.execute(update(PromoCode).where(
            PromoCode.code == code,
            (PromoCode.max_redemptions.is_(None)) | (PromoCode.redemptions < PromoCode.max_redemptions),
        ).values(redemptions=PromoCode.redemptions + 1))
        if cast("CursorResult[Any]", taken).rowcount != 1:
            raise HTTPException(410, detail=error_body("code_exhausted", f"promo code {code!r} is used up",
                                                       field="promo_code"))
        request_id = f"promo:{code}"
        earlier = await journaled_change(session, account_id, request_id)
        if earlier is not None:  # credited by an attempt whose commit failed: record it, never again
            row.transaction_id = earlier
            remaining = (await rt.meter.balance(account_id)).remaining_tokens
        else:
            receipt = await rt.meter.credit(account_id, promo.bonus_tokens, bucket="bonus", kind="bonus",
                                            note=f"Promo code: {code}", reference=code, request_id=request_id)
            row.transaction_id, remaining = receipt.transaction_id, receipt.remaining
    return {"message": "Promo code redeemed successfully!", "bonus_tokens": row.bonus_tokens,
            "new_balance": remaining, "transaction_id": row.transaction_id}


def _already(code: str, done: PromoRedemption) -> HTTPException:
    """The stored result of a finished redemption (rows from before 0005 may lack the journal id)."""
    return HTTPException(409, detail=error_body(
        "already_redeemed", f"promo code {code!r} was already redeemed", bonus_tokens=done.bonus_tokens,
        transaction_id=done.transaction_id, redeemed_at=_aware(done.created_at).isoformat(timespec="seconds")))


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=UTC)


STREAM_LEASE_MS = 30_000  # an open stream renews its slot every 10 s; a crashed worker's lapse within this


async def _take_stream_slot(state: AppState, account_id: str, stream_id: str) -> str:
    """Hold one of the user's `sse_max_streams` slots (a zset shared by every worker, scored by
    lease end: slots of streams that died without closing lapse); 429 when all are taken."""
    rt = state.rt
    key = keyspace.stream_slots_key(account_id, shards=rt.settings.shards, prefix=rt.settings.key_prefix)
    now = int(time.time() * 1000)
    try:
        async with rt.redis.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(key, "-inf", now)
            pipe.zadd(key, {stream_id: now + STREAM_LEASE_MS})
            pipe.zcard(key)
            pipe.pexpire(key, STREAM_LEASE_MS)
            _, _, open_streams, _ = await pipe.execute()
    except (RedisError, OSError) as exc:  # fail closed, as the meter does: 503, not a 500
        raise StoreUnavailable(f"stream slots: {exc}") from exc
    if open_streams > rt.settings.sse_max_streams:  # added first, counted after: never over the cap
        await rt.redis.zrem(key, stream_id)
        retry = STREAM_LEASE_MS // 1000
        raise HTTPException(429, headers={"Retry-After": str(retry)}, detail=error_body(
            "too_many_streams", f"at most {rt.settings.sse_max_streams} open balance streams per user; "
                                "close one first", retry_after_s=retry))
    return key


@router.get("/stream", summary="Server-Sent Events: the balance now and after every change",
            responses={429: {"description": "the user has the maximum number of streams open"}})
async def stream(request: Request, account_id: str = Depends(current_user),
                 state: AppState = Depends(app_state)) -> StreamingResponse:
    rt = state.rt
    key = keyspace.account_keys(account_id, shards=rt.settings.shards, prefix=rt.settings.key_prefix).account
    await rt.meter.balance(account_id)  # 404 before the stream starts if the account is unknown
    stream_id = uuid.uuid4().hex
    slots = await _take_stream_slot(state, account_id, stream_id)

    async def events() -> AsyncIterator[str]:
        last: str | None = None
        beats = 0
        try:
            while not await request.is_disconnected():
                seq = replies.optional_text(await rt.redis.hget(key, "seq"))
                if seq != last:
                    last = seq
                    body = (await rt.meter.balance(account_id)).as_dict()
                    yield f"event: balance\nid: {seq}\ndata: {json.dumps(body)}\n\n"
                beats += 1
                if beats % 30 == 0:
                    yield ": keep-alive\n\n"
                if beats % 40 == 0:  # every 10 s: renew the slot's lease
                    async with rt.redis.pipeline(transaction=True) as pipe:
                        pipe.zadd(slots, {stream_id: int(time.time() * 1000) + STREAM_LEASE_MS})
                        pipe.pexpire(slots, STREAM_LEASE_MS)
                        await pipe.execute()
                await asyncio.sleep(0.25)  # the balance reaches the client within a second of a change
        finally:
            with anyio.CancelScope(shield=True):  # a cancelled stream still gives its slot back
                await rt.redis.zrem(slots, stream_id)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
