"""Token packs and paid plans bought with money: start a purchase (user JWT; plans start theirs in
`api.routes.plans`), and the payment events that complete it (provider webhooks, the test
provider's signed checkout). A plan purchase's paid event changes the plan instead of crediting
tokens (`api.plan_billing`), by the same exactly-once steps.

What a payment event does, exactly once, is in `api.billing`; these routes translate.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from api import billing
from api.deps import current_user
from api.errors import error_body
from api.payments import (
    BadPayload,
    BadSignature,
    CheckoutOf,
    NotConfigured,
    PaymentProvider,
    Payments,
    ProviderError,
)
from api.plan_billing import period_label
from api.state import AppState, app_state, payments
from persistence.models import TokenPurchase, utcnow

router = APIRouter(tags=["purchases"])
log = logging.getLogger("tokenmeter.payments")

MAX_WEBHOOK_BYTES = 64 * 1024

IdempotencyKey = Annotated[str | None, Header(min_length=1, max_length=255,
                                              description="retries with the same key return the same purchase")]


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _inr(paise: int) -> str:
    return f"{paise // 100}.{paise % 100:02d}"




def _body(state: AppState, pay: Payments, row: TokenPurchase, *, replayed: bool | None = None) -> dict[str, Any]:
    provider = pay.get(row.provider)
    checkout = None
    if row.status == "pending" and row.provider_order_id and provider is not None:
        checkout = provider.checkout(CheckoutOf(row.id, row.provider_order_id, row.amount_paise, row.currency,
                                                _description(state, row)))
    out: dict[str, Any] = {
        "purchase_id": row.id, "kind": row.kind or "pack", "package_id": row.package_id, "tokens": row.tokens,
        "plan": row.plan_id, "period": period_label(row.period) if row.period is not None else None,
        "amount": row.amount_paise, "amount_inr": _inr(row.amount_paise), "currency": row.currency,
        "status": row.status, "provider": row.provider, "order_id": row.provider_order_id, "checkout": checkout,
        "refunded_amount": row.refunded_paise, "refunded_tokens": row.refunded_tokens,
        "owed_tokens": row.owed_tokens, "credit_transaction_id": row.credit_transaction_id,
        "created_at": _aware(row.created_at).isoformat(timespec="seconds"),
        "paid_at": _aware(row.paid_at).isoformat(timespec="seconds") if row.paid_at else None,
    }
    if replayed is not None:
        out["replayed"] = replayed
    return out


def _description(state: AppState, row: TokenPurchase) -> str:
    if row.kind == "plan":
        plan = state.rt.catalog.plans.get(row.plan_id or "")
        return f"{plan.name if plan else row.plan_id} plan, {period_label(row.period or 0)}"
    pack = state.rt.catalog.packs.get(row.package_id)
    return pack.name if pack else row.package_id


# -- starting a purchase -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Item:
    """What a purchase buys: a pack (tokens) or a plan for one period (month index)."""

    kind: str  # pack | plan
    package_id: str  # the pack's id; for a plan, the plan's id
    tokens: int
    amount_paise: int
    plan_id: str | None = None
    period: int | None = None
    previous_plan: str | None = None


class PurchaseIn(BaseModel):
    package_id: str = Field(min_length=1, max_length=32, examples=["pro"], description="starter, pro or unlimited")


async def find_or_create(state: AppState, account_id: str, item: Item, key: str | None,
                         provider: str) -> tuple[TokenPurchase, bool]:
    """The purchase of this Idempotency-Key (replayed=True), else a new pending one."""
    for attempt in range(2):
        try:
            async with state.rt.db.sessions() as session, session.begin():
                if key is not None:
                    found = (await session.execute(select(TokenPurchase).where(
                        TokenPurchase.account_id == account_id, TokenPurchase.idempotency_key == key))
                    ).scalar_one_or_none()
                    if found is not None:
                        if (found.kind, found.package_id, found.period) != (item.kind, item.package_id,
                                                                            item.period):
                            raise HTTPException(409, detail=error_body(
                                "idempotency_conflict", f"Idempotency-Key {key!r} was used for the "
                                f"{found.package_id!r} {found.kind}", idempotency_key=key,
                                field="plan" if item.kind == "plan" else "package_id"))
                        return found, True
                row = TokenPurchase(id=str(uuid.uuid4()), account_id=account_id, package_id=item.package_id,
                                    tokens=item.tokens, amount_paise=item.amount_paise, currency="INR",
                                    status=billing.PurchaseStatus.PENDING, provider=provider, idempotency_key=key,
                                    refunded_tokens=0, refunded_paise=0, owed_tokens=0, created_at=utcnow(),
                                    kind=item.kind, plan_id=item.plan_id, period=item.period,
                                    previous_plan=item.previous_plan)
                session.add(row)
            return row, False
        except IntegrityError:  # a concurrent request with the same key created it: read that one
            if key is None or attempt:
                raise
    raise AssertionError("unreachable")


@router.post("/api/v1/tokens/purchase", status_code=201,
             summary="Buy a token pack: a pending purchase and a payment order (Idempotency-Key honoured)",
             responses={200: {"description": "the same Idempotency-Key again: the same purchase, replayed"},
                        409: {"description": "the Idempotency-Key was used for another pack"},
                        422: {"description": "unknown package_id"},
                        503: {"description": "the payment provider could not create the order"}})
async def purchase(body: PurchaseIn, idempotency_key: IdempotencyKey = None,
                   account_id: str = Depends(current_user), state: AppState = Depends(app_state),
                   pay: Payments = Depends(payments)) -> JSONResponse:
    """Creates a pending purchase and an order with the payment provider, and answers what a
    frontend needs to pay: purchase id, order id, amount (paise), currency, provider and the
    provider's checkout options. Tokens arrive in the `premium` bucket when the provider reports
    the payment (webhook), exactly once."""
    packs = state.rt.catalog.packs
    if body.package_id not in packs:
        raise HTTPException(422, detail=error_body(
            "invalid_input", f"package_id: unknown pack {body.package_id!r}; known: {sorted(packs)}",
            field="package_id"))
    pack = packs[body.package_id]
    item = Item("pack", pack.id, pack.tokens, pack.price_inr_paise)
    return await start_purchase(state, pay, account_id, item, idempotency_key)


async def start_purchase(state: AppState, pay: Payments, account_id: str, item: Item,
                         idempotency_key: str | None) -> JSONResponse:
    """The pending purchase of `item` with its provider order: 201, or 200 for a replayed key."""
    row, replayed = await find_or_create(state, account_id, item, idempotency_key, pay.default)
    provider = pay.get(row.provider)
    if row.provider_order_id is None and provider is not None:
        try:
            order = await provider.create_order(purchase_id=row.id, amount=row.amount_paise, currency=row.currency,
                                                notes={"purchase_id": row.id, "account_id": account_id,
                                                       "package_id": row.package_id, "kind": row.kind})
        except (ProviderError, NotConfigured) as exc:
            log.error("payment order for purchase %s (%s) failed: %s", row.id, row.provider, exc)
            raise HTTPException(503, headers={"Retry-After": "5"}, detail=error_body(
                "payment_provider_unavailable", f"{row.provider} could not create the order; retry with the "
                "same Idempotency-Key", purchase_id=row.id)) from None
        async with state.rt.db.sessions() as session, session.begin():
            await session.execute(update(TokenPurchase).where(
                TokenPurchase.id == row.id, TokenPurchase.provider_order_id.is_(None)).values(
                provider_order_id=order.order_id))
            row = (await session.execute(select(TokenPurchase).where(TokenPurchase.id == row.id))).scalar_one()
    return JSONResponse(_body(state, pay, row, replayed=replayed), status_code=200 if replayed else 201)


async def _expire(state: AppState, row: TokenPurchase) -> TokenPurchase:
    if not billing.checkout_expired(state.rt, row):
        return row
    async with state.rt.db.sessions() as session, session.begin():
        await session.execute(update(TokenPurchase).where(
            TokenPurchase.id == row.id, TokenPurchase.status == billing.PurchaseStatus.PENDING).values(
                status=billing.PurchaseStatus.EXPIRED))
        return (await session.execute(select(TokenPurchase).where(TokenPurchase.id == row.id))).scalar_one()


@router.get("/api/v1/tokens/purchases", summary="Your purchases, newest first")
async def list_purchases(account_id: str = Depends(current_user), state: AppState = Depends(app_state),
                         pay: Payments = Depends(payments)) -> list[dict[str, Any]]:
    async with state.rt.db.sessions() as session:
        rows = list((await session.execute(select(TokenPurchase).where(
            TokenPurchase.account_id == account_id).order_by(TokenPurchase.created_at.desc()).limit(100))).scalars())
    return [_body(state, pay, await _expire(state, r)) for r in rows]


@router.get("/api/v1/tokens/purchases/{purchase_id}", summary="One of your purchases (poll after paying)")
async def get_purchase(purchase_id: str, account_id: str = Depends(current_user),
                       state: AppState = Depends(app_state), pay: Payments = Depends(payments)) -> dict[str, Any]:
    async with state.rt.db.sessions() as session:
        row = (await session.execute(select(TokenPurchase).where(
            TokenPurchase.id == purchase_id[:36], TokenPurchase.account_id == account_id))).scalar_one_or_none()
    if row is None:
        raise HTTPException(404, detail=error_body("not_found", f"no purchase {purchase_id!r}"))
    return _body(state, pay, await _expire(state, row))


# -- payment events ----------------------------------------------------------------------------


async def _receive(request: Request, state: AppState, provider: PaymentProvider) -> JSONResponse:
    body = await request.body()
    if len(body) > MAX_WEBHOOK_BYTES:
        raise _http(413, "payload_too_large", f"webhook bodies are at most {MAX_WEBHOOK_BYTES} bytes")
    try:
        event = provider.parse_webhook(body, request.headers)
    except BadSignature as exc:
        raise _http(400, "invalid_signature", f"{provider.name} webhook: {exc}") from None
    except BadPayload as exc:
        raise _http(400, "invalid_payload", f"{provider.name} webhook: {exc}") from None
    except NotConfigured as exc:
        log.error("%s webhook received but the provider is not configured: %s", provider.name, exc)
        raise HTTPException(404, detail=error_body(
            "provider_not_configured", f"{provider.name} webhooks are not configured on this server")) from None
    if event is None:
        log.info("%s webhook of a type this service ignores, acknowledged", provider.name)
        return JSONResponse({"status": "ignored"})
    try:
        applied = await billing.apply_event(state.rt, provider, event)
    except billing.Refused as exc:
        raise HTTPException(exc.status, detail=exc.body) from None
    return JSONResponse(applied.body, status_code=applied.status)


def _http(status: int, error: str, message: str) -> HTTPException:
    """A refusal before the event is known (size, signature, payload), logged like billing's."""
    exc = billing.refuse(status, error, message)
    return HTTPException(exc.status, detail=exc.body)


@router.post("/api/v1/payments/webhook/{provider_name}", tags=["payments"],
             summary="Payment provider webhook (razorpay; test): verified by HMAC-SHA256 of the raw body",
             responses={400: {"description": "bad signature or payload"}, 404: {"description": "unknown order"},
                        409: {"description": "event already processed, or refund before payment"},
                        422: {"description": "amount or currency does not match the order"}})
async def webhook(provider_name: str, request: Request, state: AppState = Depends(app_state),
                  pay: Payments = Depends(payments)) -> JSONResponse:
    provider = pay.get(provider_name)
    if provider is None:
        raise HTTPException(404, detail=error_body("unknown_provider", f"no payment provider {provider_name!r}"))
    return await _receive(request, state, provider)


@router.post("/api/v1/payments/test/complete", tags=["payments"],
             summary="Complete a test-provider checkout (signed with the test secret; same as its webhook)")
async def test_complete(request: Request, state: AppState = Depends(app_state),
                        pay: Payments = Depends(payments)) -> JSONResponse:
    provider = pay.get("test")
    assert provider is not None
    return await _receive(request, state, provider)
