"""Billing: what a verified payment event does to its purchase and the wallet, exactly once.
No web framework here: `apply_event` returns an `Applied` (status and body) or raises `Refused`;
the routes (api/routes/purchases.py) translate. A plan purchase's paid event changes the plan
instead of crediting tokens (api/plan_billing.py), by the same exactly-once steps.

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
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, NamedTuple, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from api import plan_billing
from api.payments import PaymentProvider, WebhookEvent
from api.runtime import Runtime
from meter._http import error_body
from persistence.journaled import journaled_change
from persistence.models import PaymentEvent, TokenPurchase, utcnow

__all__ = ["PAYABLE", "Applied", "PurchaseStatus", "Refused", "apply_event", "checkout_expired", "refuse"]

log = logging.getLogger("tokenmeter.payments")


class PurchaseStatus(StrEnum):
    """A purchase's life: pending → paid → refunded; pending → failed or expired (both may
    still be paid: a provider retry, a late capture)."""

    PENDING = "pending"
    PAID = "paid"
    FAILED = "failed"
    EXPIRED = "expired"
    REFUNDED = "refunded"


PAYABLE = (PurchaseStatus.PENDING, PurchaseStatus.FAILED, PurchaseStatus.EXPIRED)


class Applied(NamedTuple):
    """An event's outcome: the HTTP status to answer the provider with, and the body."""

    status: int
    body: dict[str, Any]


class Refused(Exception):
    """The event was refused and nothing changed: answer `status` with `body`."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body.get("message", ""))
        self.status, self.body = status, body


def refuse(status: int, error: str, message: str, event: WebhookEvent | None = None, **details: Any) -> Refused:
    where = f" (provider {event.provider}, event {event.event_id}, order {event.order_id})" if event else ""
    log.warning("payment event refused: %s: %s%s", error, message, where)
    return Refused(status, error_body(error, message, **details))


async def _execute(session: AsyncSession, statement: Any) -> CursorResult[Any]:
    """An UPDATE, whose result tells how many rows it moved (`rowcount`)."""
    return cast("CursorResult[Any]", await session.execute(statement))


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def checkout_expired(rt: Runtime, row: TokenPurchase) -> bool:
    """A pending purchase older than its checkout's lifetime (TOKENMETER_PURCHASE_CHECKOUT_TTL_S)."""
    ttl = timedelta(seconds=rt.settings.purchase_checkout_ttl_s)
    return row.status == PurchaseStatus.PENDING and _aware(row.created_at) + ttl <= datetime.now(UTC)


async def apply_event(rt: Runtime, provider: PaymentProvider, event: WebhookEvent) -> Applied:
    """Apply one verified event to its purchase and the wallet, exactly once (see the module doc).
    Refusals raise `Refused` and change nothing."""
    async with rt.db.sessions() as session, session.begin():
        row = (await session.execute(select(TokenPurchase).where(
            TokenPurchase.provider == event.provider, TokenPurchase.provider_order_id == event.order_id))
        ).scalar_one_or_none()
        if row is None:
            raise refuse(404, "unknown_order", f"no purchase has order {event.order_id!r}", event,
                          order_id=event.order_id)
        if event.currency != row.currency:
            raise refuse(422, "currency_mismatch", f"the event's currency {event.currency} is not the order's "
                          f"{row.currency}", event, field="currency", expected=row.currency, got=event.currency)
        if event.amount != row.amount_paise:
            raise refuse(422, "amount_mismatch", f"the event's amount {event.amount} is not the order's "
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
            raise Refused(409, error_body(
                "duplicate_event", f"event {event.event_id!r} ({event.kind} {event.object_id}) was already "
                f"processed; nothing changed", event_id=event.event_id, purchase_id=purchase_id)) from None
        row = (await session.execute(select(TokenPurchase).where(TokenPurchase.id == purchase_id).with_for_update()
                                     .execution_options(populate_existing=True))).scalar_one()
        if event.kind == "paid":
            outcome = await _paid(rt, provider, session, row, record, event)
        elif event.kind == "failed":
            outcome = await _failed(session, row, record, event)
        else:
            outcome = await _refunded(rt, session, row, record, event)
        record.outcome = outcome.body["outcome"]
    log.info("payment event %s (%s) of purchase %s: %s", event.event_id, event.event_type,
             outcome.body["purchase_id"], outcome.body["outcome"])
    return outcome


def _result(row: TokenPurchase, event: WebhookEvent, outcome: str, **more: Any) -> dict[str, Any]:
    return {"status": "processed", "outcome": outcome, "event_id": event.event_id, "kind": event.kind,
            "purchase_id": row.id, "purchase_status": row.status, **more}


async def _paid(rt: Runtime, provider: PaymentProvider, session: AsyncSession, row: TokenPurchase,
                record: PaymentEvent, event: WebhookEvent) -> Applied:
    if row.status not in PAYABLE:
        log.warning("a second payment %s for purchase %s (already %s): not credited; refund it",
                    event.object_id, row.id, row.status)
        return Applied(200, _result(row, event, "ignored", credited_tokens=0,
                            message=f"the purchase is already {row.status}; nothing credited"))
    if provider.checkout_closes and (row.status == PurchaseStatus.EXPIRED or checkout_expired(rt, row)):
        await session.execute(update(TokenPurchase).where(TokenPurchase.id == row.id, TokenPurchase.status.in_(
            PAYABLE)).values(status=PurchaseStatus.EXPIRED))
        row.status = PurchaseStatus.EXPIRED
        log.warning("payment %s for expired purchase %s refused", event.object_id, row.id)
        return Applied(410, {**error_body("order_expired", f"purchase {row.id} expired before it was paid; nothing "
                                  "credited", purchase_id=row.id), "outcome": "expired", "purchase_id": row.id})
    moved = await _execute(session, update(TokenPurchase).where(
        TokenPurchase.id == row.id, TokenPurchase.status.in_(PAYABLE)).values(
        status=PurchaseStatus.PAID, paid_at=utcnow(), provider_payment_id=event.payment_id))
    if moved.rowcount != 1:  # cannot happen while the row is locked; refuse rather than credit twice
        raise refuse(409, "concurrent_update", f"purchase {row.id} changed concurrently; retry", event)
    if row.kind == "plan":
        applied = await plan_billing.apply_paid(rt, session, row)
        record.tokens = 0
        row.status = PurchaseStatus.PAID
        return Applied(200, _result(row, event, "plan_applied", credited_tokens=0, **applied))
    pack = rt.catalog.packs.get(row.package_id)
    request_id = f"purchase:{row.id}"
    earlier = await journaled_change(session, row.account_id, request_id)
    if earlier is not None:  # credited by a delivery whose commit failed: record it, never again
        transaction_id, remaining = earlier, (await rt.meter.balance(row.account_id)).remaining_tokens
    else:
        receipt = await rt.meter.credit(
            row.account_id, row.tokens, bucket="premium", kind="purchase",
            note=f"Purchase: {pack.name if pack else row.package_id} ({row.tokens} tokens)",
            reference=row.id, request_id=request_id)
        transaction_id, remaining = receipt.transaction_id, receipt.remaining
    await session.execute(update(TokenPurchase).where(TokenPurchase.id == row.id).values(
        credit_transaction_id=transaction_id))
    record.tokens = row.tokens
    row.status = PurchaseStatus.PAID
    return Applied(200, _result(row, event, "credited", credited_tokens=row.tokens, transaction_id=transaction_id,
                        remaining_tokens=remaining))


async def _failed(session: AsyncSession, row: TokenPurchase, record: PaymentEvent, event: WebhookEvent
                  ) -> Applied:
    moved = await _execute(session, update(TokenPurchase).where(
        TokenPurchase.id == row.id, TokenPurchase.status.in_((PurchaseStatus.PENDING, PurchaseStatus.EXPIRED))).values(
        status=PurchaseStatus.FAILED, provider_payment_id=event.payment_id))
    if moved.rowcount == 1:
        row.status = PurchaseStatus.FAILED
        return Applied(200, _result(row, event, "failed", credited_tokens=0))
    # e.g. a failed attempt reported after a paid one
    return Applied(200, _result(row, event, "ignored", credited_tokens=0,
                                message=f"the purchase is {row.status}; nothing changed"))


async def _refunded(rt: Runtime, session: AsyncSession, row: TokenPurchase, record: PaymentEvent,
                    event: WebhookEvent) -> Applied:
    # e.g. delivered before the payment: the provider's retry will do
    if row.status not in (PurchaseStatus.PAID, PurchaseStatus.REFUNDED):
        raise refuse(409, "not_paid", f"purchase {row.id} is {row.status}, not paid; the refund can only be "
                      "applied after the payment", event, purchase_id=row.id)
    before = row.refunded_paise
    after = before + event.refunded_amount
    if after > row.amount_paise:
        raise refuse(422, "refund_exceeds_payment", f"refunds would total {after} paise of a {row.amount_paise} "
                      "paise payment", event, field="refunded_amount")
    if row.kind == "plan":  # the first refund of a plan takes the plan back; later parts only add up money
        reverted = await plan_billing.revert_refunded(rt, session, row) if row.status == PurchaseStatus.PAID \
            else {"plan_reverted": False}
        await session.execute(update(TokenPurchase).where(TokenPurchase.id == row.id).values(
            status=PurchaseStatus.REFUNDED, refunded_paise=after))
        row.status = PurchaseStatus.REFUNDED
        return Applied(200, _result(row, event, "refunded", refunded_amount=event.refunded_amount, refund_tokens=0,
                            taken_tokens=0, owed_tokens=0, **reverted))
    # Tokens for the money refunded so far minus those already handled: refunds in parts add up.
    tokens = row.tokens * after // row.amount_paise - row.tokens * before // row.amount_paise
    taken = owed = 0
    transaction_id = None
    if tokens:
        receipt = await rt.meter.adjust(
            row.account_id, tokens, bucket="premium", kind="refund", note=f"Refund of purchase {row.id}",
            reference=row.id, request_id=f"refund:{event.object_id}")
        taken, owed, transaction_id = receipt.tokens, receipt.uncollected, receipt.transaction_id or None
    await session.execute(update(TokenPurchase).where(TokenPurchase.id == row.id).values(
        status=PurchaseStatus.REFUNDED, refunded_paise=after, refunded_tokens=TokenPurchase.refunded_tokens + taken,
        owed_tokens=TokenPurchase.owed_tokens + owed))
    record.tokens = taken
    row.status = PurchaseStatus.REFUNDED
    if owed:
        log.warning("refund %s of purchase %s: %d tokens were already spent and are owed", event.object_id,
                    row.id, owed)
    return Applied(200, _result(row, event, "refunded", refunded_amount=event.refunded_amount, refund_tokens=tokens,
                        taken_tokens=taken, owed_tokens=owed, transaction_id=transaction_id))
