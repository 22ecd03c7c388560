"""Token packs and paid plans bought with money: start a purchase (user JWT; plans start theirs in
`api.routes.plans`), and the payment events that complete it (provider webhooks, the test
provider's signed checkout). A plan purchase's paid event changes the plan instead of crediting
tokens (`api.plan_billing`), by the same exactly-once steps.

Exactly-once crediting. Every verified event is applied in ONE database transaction:
  1. the purchase is found by (provider, order id) and the event's amount and currency are
     checked against it (a mismatch is refused and logged; nothing is recorded);
  2. the event is inserted into `payment_events`, unique on (provider, event id) and on
     (provider, kind, payment/refund id): a redelivered, replayed or concurrent copy of an event
     waits for the first copy's transaction and then fails here -> 409, nothing changes;
  3. the purchase row is locked (SELECT ... FOR UPDATE; SQLite holds its write lock already)
     and moved by a conditional UPDATE (pending/failed/expired -> paid; pending -> failed;
     paid -> refunded);
  4. the wallet change is made, still inside the transaction, idempotently by request id
     (`purchase:<purchase id>` credits the premium bucket, `refund:<refund id>` takes tokens
     back; for a plan purchase `plan:<purchase id>` sets the plan, `planrefund:<purchase id>` restores
     the one before), and its journal id is stored on the row; then COMMIT.
If Redis is down the wallet call fails, the transaction rolls back, nothing is recorded and the
provider's retry does it all again. If the commit fails after the wallet call, the retry repeats
it and the wallet call is a replay (same request id) that changes nothing. Because the duplicate
copies of an event only get past step 2 after the first copy committed, exactly one delivery
answers 200 and the rest 409, and the tokens are credited once.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from api import plan_billing
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
    WebhookEvent,
)
from api.plan_billing import period_label
from api.state import AppState, app_state, payments
from persistence.journaled import journaled_change
from persistence.models import PaymentEvent, TokenPurchase, utcnow

router = APIRouter(tags=["purchases"])
log = logging.getLogger("tokenmeter.payments")

MAX_WEBHOOK_BYTES = 64 * 1024
PAYABLE = ("pending", "failed", "expired")

IdempotencyKey = Annotated[str | None, Header(min_length=1, max_length=255,
                                              description="retries with the same key return the same purchase")]


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _inr(paise: int) -> str:
    return f"{paise // 100}.{paise % 100:02d}"


def _expired(state: AppState, row: TokenPurchase) -> bool:
    ttl = timedelta(seconds=state.rt.settings.purchase_checkout_ttl_s)
    return row.status == "pending" and _aware(row.created_at) + ttl <= datetime.now(UTC)


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
                                    status="pending", provider=provider, idempotency_key=key, refunded_tokens=0,
                                    refunded_paise=0, owed_tokens=0, created_at=utcnow(), kind=item.kind,
                                    plan_id=item.plan_id, period=item.period, previous_plan=item.previous_plan)
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
    if not _expired(state, row):
        return row
    async with state.rt.db.sessions() as session, session.begin():
        await session.execute(update(TokenPurchase).where(
            TokenPurchase.id == row.id, TokenPurchase.status == "pending").values(status="expired"))
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


def _refuse(status: int, error: str, message: str, event: WebhookEvent | None = None, **details: Any
            ) -> HTTPException:
    where = f" (provider {event.provider}, event {event.event_id}, order {event.order_id})" if event else ""
    log.warning("payment event refused: %s: %s%s", error, message, where)
    return HTTPException(status, detail=error_body(error, message, **details))


async def _receive(request: Request, state: AppState, provider: PaymentProvider) -> JSONResponse:
    body = await request.body()
    if len(body) > MAX_WEBHOOK_BYTES:
        raise _refuse(413, "payload_too_large", f"webhook bodies are at most {MAX_WEBHOOK_BYTES} bytes")
    try:
        event = provider.parse_webhook(body, request.headers)
    except BadSignature as exc:
        raise _refuse(400, "invalid_signature", f"{provider.name} webhook: {exc}") from None
    except BadPayload as exc:
        raise _refuse(400, "invalid_payload", f"{provider.name} webhook: {exc}") from None
    except NotConfigured as exc:
        log.error("%s webhook received but the provider is not configured: %s", provider.name, exc)
        raise HTTPException(404, detail=error_body(
            "provider_not_configured", f"{provider.name} webhooks are not configured on this server")) from None
    if event is None:
        log.info("%s webhook of a type this service ignores, acknowledged", provider.name)
        return JSONResponse({"status": "ignored"})
    status, out = await apply_event(state, provider, event)
    return JSONResponse(out, status_code=status)


async def apply_event(state: AppState, provider: PaymentProvider, event: WebhookEvent) -> tuple[int, dict[str, Any]]:
    """Apply one verified event to its purchase and the wallet, exactly once (see the module doc).
    Returns (HTTP status, body); refusals raise HTTPException and change nothing."""
    rt = state.rt
    async with rt.db.sessions() as session, session.begin():
        row = (await session.execute(select(TokenPurchase).where(
            TokenPurchase.provider == event.provider, TokenPurchase.provider_order_id == event.order_id))
        ).scalar_one_or_none()
        if row is None:
            raise _refuse(404, "unknown_order", f"no purchase has order {event.order_id!r}", event,
                          order_id=event.order_id)
        if event.currency != row.currency:
            raise _refuse(422, "currency_mismatch", f"the event's currency {event.currency} is not the order's "
                          f"{row.currency}", event, field="currency", expected=row.currency, got=event.currency)
        if event.amount != row.amount_paise:
            raise _refuse(422, "amount_mismatch", f"the event's amount {event.amount} is not the order's "
                          f"{row.amount_paise} (paise)", event, field="amount", expected=row.amount_paise,
                          got=event.amount)
        purchase_id = row.id
        record = PaymentEvent(provider=event.provider, event_id=event.event_id, event_type=event.event_type,
                              kind=event.kind, object_id=event.object_id, order_id=event.order_id,
                              purchase_id=row.id, amount_paise=event.amount, currency=event.currency,
                              refunded_paise=event.refunded_amount, tokens=0, outcome="received",
                              received_at=utcnow())
        session.add(record)
        try:
            await session.flush()  # waits for a concurrent copy of this event; fails if it committed
        except IntegrityError:
            log.info("payment event replayed: provider %s, event %s (%s %s), order %s", event.provider,
                     event.event_id, event.kind, event.object_id, event.order_id)
            raise HTTPException(409, detail=error_body(
                "duplicate_event", f"event {event.event_id!r} ({event.kind} {event.object_id}) was already "
                f"processed; nothing changed", event_id=event.event_id, purchase_id=purchase_id)) from None
        row = (await session.execute(select(TokenPurchase).where(TokenPurchase.id == purchase_id).with_for_update()
                                     .execution_options(populate_existing=True))).scalar_one()
        if event.kind == "paid":
            status, out = await _paid(state, provider, session, row, record, event)
        elif event.kind == "failed":
            status, out = await _failed(session, row, record, event)
        else:
            status, out = await _refunded(state, session, row, record, event)
        record.outcome = out["outcome"]
    log.info("payment event %s (%s) of purchase %s: %s", event.event_id, event.event_type, out["purchase_id"],
             out["outcome"])
    return status, out


def _result(row: TokenPurchase, event: WebhookEvent, outcome: str, **more: Any) -> dict[str, Any]:
    return {"status": "processed", "outcome": outcome, "event_id": event.event_id, "kind": event.kind,
            "purchase_id": row.id, "purchase_status": row.status, **more}


async def _paid(state: AppState, provider: PaymentProvider, session: Any, row: TokenPurchase,
                record: PaymentEvent, event: WebhookEvent) -> tuple[int, dict[str, Any]]:
    if row.status not in PAYABLE:
        log.warning("a second payment %s for purchase %s (already %s): not credited; refund it",
                    event.object_id, row.id, row.status)
        return 200, _result(row, event, "ignored", credited_tokens=0,
                            message=f"the purchase is already {row.status}; nothing credited")
    if provider.checkout_closes and (row.status == "expired" or _expired(state, row)):
        await session.execute(update(TokenPurchase).where(TokenPurchase.id == row.id, TokenPurchase.status.in_(
            PAYABLE)).values(status="expired"))
        row.status = "expired"
        log.warning("payment %s for expired purchase %s refused", event.object_id, row.id)
        return 410, {**error_body("order_expired", f"purchase {row.id} expired before it was paid; nothing "
                                  "credited", purchase_id=row.id), "outcome": "expired", "purchase_id": row.id}
    moved = await session.execute(update(TokenPurchase).where(
        TokenPurchase.id == row.id, TokenPurchase.status.in_(PAYABLE)).values(
        status="paid", paid_at=utcnow(), provider_payment_id=event.payment_id))
    if moved.rowcount != 1:  # cannot happen while the row is locked; refuse rather than credit twice
        raise _refuse(409, "concurrent_update", f"purchase {row.id} changed concurrently; retry", event)
    if row.kind == "plan":
        applied = await plan_billing.apply_paid(state.rt, session, row)
        record.tokens = 0
        row.status = "paid"
        return 200, _result(row, event, "plan_applied", credited_tokens=0, **applied)
    pack = state.rt.catalog.packs.get(row.package_id)
    request_id = f"purchase:{row.id}"
    earlier = await journaled_change(session, row.account_id, request_id)
    if earlier is not None:  # credited by a delivery whose commit failed: record it, never again
        transaction_id, remaining = earlier, (await state.rt.meter.balance(row.account_id)).remaining_tokens
    else:
        receipt = await state.rt.meter.credit(
            row.account_id, row.tokens, bucket="premium", kind="purchase",
            note=f"Purchase: {pack.name if pack else row.package_id} ({row.tokens} tokens)",
            reference=row.id, request_id=request_id)
        transaction_id, remaining = receipt.transaction_id, receipt.remaining
    await session.execute(update(TokenPurchase).where(TokenPurchase.id == row.id).values(
        credit_transaction_id=transaction_id))
    record.tokens = row.tokens
    row.status = "paid"
    return 200, _result(row, event, "credited", credited_tokens=row.tokens, transaction_id=transaction_id,
                        remaining_tokens=remaining)


async def _failed(session: Any, row: TokenPurchase, record: PaymentEvent, event: WebhookEvent
                  ) -> tuple[int, dict[str, Any]]:
    moved = await session.execute(update(TokenPurchase).where(
        TokenPurchase.id == row.id, TokenPurchase.status.in_(("pending", "expired"))).values(
        status="failed", provider_payment_id=event.payment_id))
    if moved.rowcount == 1:
        row.status = "failed"
        return 200, _result(row, event, "failed", credited_tokens=0)
    return 200, _result(row, event, "ignored", credited_tokens=0,  # e.g. a failed attempt reported after a paid one
                        message=f"the purchase is {row.status}; nothing changed")


async def _refunded(state: AppState, session: Any, row: TokenPurchase, record: PaymentEvent,
                    event: WebhookEvent) -> tuple[int, dict[str, Any]]:
    if row.status not in ("paid", "refunded"):  # e.g. delivered before the payment: the retry will do
        raise _refuse(409, "not_paid", f"purchase {row.id} is {row.status}, not paid; the refund can only be "
                      "applied after the payment", event, purchase_id=row.id)
    before = row.refunded_paise
    after = before + event.refunded_amount
    if after > row.amount_paise:
        raise _refuse(422, "refund_exceeds_payment", f"refunds would total {after} paise of a {row.amount_paise} "
                      "paise payment", event, field="refunded_amount")
    if row.kind == "plan":  # the first refund of a plan takes the plan back; later parts only add up money
        reverted = await plan_billing.revert_refunded(state.rt, session, row) if row.status == "paid" \
            else {"plan_reverted": False}
        await session.execute(update(TokenPurchase).where(TokenPurchase.id == row.id).values(
            status="refunded", refunded_paise=after))
        row.status = "refunded"
        return 200, _result(row, event, "refunded", refunded_amount=event.refunded_amount, refund_tokens=0,
                            taken_tokens=0, owed_tokens=0, **reverted)
    # Tokens for the money refunded so far minus those already handled: refunds in parts add up.
    tokens = row.tokens * after // row.amount_paise - row.tokens * before // row.amount_paise
    taken = owed = 0
    transaction_id = None
    if tokens:
        receipt = await state.rt.meter.adjust(
            row.account_id, tokens, bucket="premium", kind="refund", note=f"Refund of purchase {row.id}",
            reference=row.id, request_id=f"refund:{event.object_id}")
        taken, owed, transaction_id = receipt.tokens, receipt.uncollected, receipt.transaction_id or None
    await session.execute(update(TokenPurchase).where(TokenPurchase.id == row.id).values(
        status="refunded", refunded_paise=after, refunded_tokens=TokenPurchase.refunded_tokens + taken,
        owed_tokens=TokenPurchase.owed_tokens + owed))
    record.tokens = taken
    row.status = "refunded"
    if owed:
        log.warning("refund %s of purchase %s: %d tokens were already spent and are owed", event.object_id,
                    row.id, owed)
    return 200, _result(row, event, "refunded", refunded_amount=event.refunded_amount, refund_tokens=tokens,
                        taken_tokens=taken, owed_tokens=owed, transaction_id=transaction_id)


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
