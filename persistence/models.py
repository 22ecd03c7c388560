"""SQLAlchemy 2 typed models. Tokens and money are integers: tokens, paise, micro-dollars."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import BigInteger, Boolean, CheckConstraint, DateTime, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["Account", "ApiKey", "Base", "PaymentEvent", "Project", "PromoCode", "PromoRedemption", "TokenBalance",
           "TokenPurchase", "TokenTransaction", "utcnow"]

# BIGINT everywhere, but SQLite only auto-increments an INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {int: BigInteger(), datetime: DateTime(timezone=True)}


class Account(Base):
    """A user of the platform (or a gateway's account). `id` is the meter's account id."""

    __tablename__ = "accounts"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    email: Mapped[str | None] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str | None] = mapped_column(String(255))
    plan: Mapped[str] = mapped_column(String(32), default="free")
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    admin_plan_at: Mapped[datetime | None] = mapped_column()  # 0005: an admin last set the plan (never lapsed)


class ApiKey(Base):
    """A service key. Only the SHA-256 of the secret is stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # public part, e.g. tmk_ab12cd34
    name: Mapped[str] = mapped_column(String(128))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[str] = mapped_column(String(128))  # comma-separated: meter, admin
    created_by: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column()


class TokenBalance(Base):
    """The account's state as of its newest flushed journal entry (`seq`): a snapshot for
    rehydration and reads; Redis holds the live balance."""

    __tablename__ = "token_balances"

    account_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    plan: Mapped[str] = mapped_column(String(32))
    period: Mapped[int] = mapped_column()  # month index: year * 12 + month - 1
    rollover_tokens: Mapped[int] = mapped_column()
    monthly_tokens: Mapped[int] = mapped_column()
    bonus_tokens: Mapped[int] = mapped_column()
    premium_tokens: Mapped[int] = mapped_column()
    reserved_tokens: Mapped[int] = mapped_column()
    remaining_tokens: Mapped[int] = mapped_column()
    used_tokens: Mapped[int] = mapped_column()
    total_requests: Mapped[int] = mapped_column()
    seq: Mapped[int] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column()
    # 0006: the daily counters as of `seq` (restored by rehydration when `day_index` is today)
    day_index: Mapped[int] = mapped_column(default=0, server_default="0")  # days since 1970-01-01 UTC
    requests_today: Mapped[int] = mapped_column(default=0, server_default="0")
    tokens_used_today: Mapped[int] = mapped_column(default=0, server_default="0")


class TokenTransaction(Base):
    """One journal entry: every change to a balance, exactly once. Keyed by (account_id, seq),
    the journal's own identity; the key also serves an account's history in order."""

    __tablename__ = "token_transactions"
    __table_args__ = (
        Index("ix_token_transactions_account_agent", "account_id", "agent_type", "created_at"),
        Index("ix_token_transactions_model_time", "model_used", "created_at"),
        # the transaction id is the key spelled as text: unique because the key is
        CheckConstraint("transaction_id = account_id || ':' || CAST(seq AS TEXT)", name="ck_token_transactions_id"),
    )

    account_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    seq: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    transaction_id: Mapped[str] = mapped_column(String(160))  # "<account>:<seq>", the same identity as text
    stream_id: Mapped[str] = mapped_column(String(40))  # the Redis stream entry it came from
    transaction_type: Mapped[str] = mapped_column(String(20))
    tokens_before: Mapped[int] = mapped_column()  # available (rollover + monthly + bonus + premium)
    tokens_changed: Mapped[int] = mapped_column()
    tokens_after: Mapped[int] = mapped_column()
    held_changed: Mapped[int] = mapped_column()
    held_after: Mapped[int] = mapped_column()
    rollover_delta: Mapped[int] = mapped_column()
    monthly_delta: Mapped[int] = mapped_column()
    bonus_delta: Mapped[int] = mapped_column()
    premium_delta: Mapped[int] = mapped_column()
    agent_type: Mapped[str | None] = mapped_column(String(64))
    model_used: Mapped[str | None] = mapped_column(String(64))
    input_tokens: Mapped[int | None] = mapped_column()
    output_tokens: Mapped[int | None] = mapped_column()
    estimated_cost_usd_micros: Mapped[int] = mapped_column()
    estimated_cost_inr_paise: Mapped[int] = mapped_column()
    request_id: Mapped[str | None] = mapped_column(String(255))
    project_id: Mapped[str | None] = mapped_column(String(128))
    hold_id: Mapped[str | None] = mapped_column(String(20))
    description: Mapped[str | None] = mapped_column(String(500))
    reference: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column()
    # 0006: the call's stored idempotency answer (fingerprint + reply), restored by rehydration
    idempotency_record: Mapped[str | None] = mapped_column(Text)
    # 0007: a 'hold' entry's expiry (ms, the journal's 'hx'); rehydration restores open holds from it
    hold_expires_ms: Mapped[int | None] = mapped_column(BigInteger)


class TokenPurchase(Base):
    __tablename__ = "token_purchases"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(128), index=True)
    package_id: Mapped[str] = mapped_column(String(32))
    tokens: Mapped[int] = mapped_column()
    amount_paise: Mapped[int] = mapped_column()
    currency: Mapped[str] = mapped_column(String(3), default="INR")
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending paid failed refunded
    provider: Mapped[str] = mapped_column(String(32))
    provider_order_id: Mapped[str | None] = mapped_column(String(128), unique=True)
    provider_payment_id: Mapped[str | None] = mapped_column(String(128))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    refunded_tokens: Mapped[int] = mapped_column(default=0)  # taken back from premium by refunds
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    paid_at: Mapped[datetime | None] = mapped_column()
    # 0003: refunds and the credit (pending -> paid -> refunded; pending -> failed/expired).
    refunded_paise: Mapped[int] = mapped_column(default=0, server_default="0")  # money refunded so far
    owed_tokens: Mapped[int] = mapped_column(default=0, server_default="0")  # refunded but already spent
    credit_transaction_id: Mapped[str | None] = mapped_column(String(160))  # the premium credit's journal id
    # 0005: a paid plan is bought like a pack; for a plan, credit_transaction_id is the plan change's.
    kind: Mapped[str] = mapped_column(String(8), default="pack", server_default="pack")  # pack | plan
    plan_id: Mapped[str | None] = mapped_column(String(32))
    period: Mapped[int | None] = mapped_column()  # month index (year * 12 + month - 1) the plan is paid for
    previous_plan: Mapped[str | None] = mapped_column(String(32))  # restored by a refund of a plan bought now

    __table_args__ = (UniqueConstraint("account_id", "idempotency_key", name="uq_purchase_idempotency"),)


class PromoCode(Base):
    __tablename__ = "promo_codes"

    code: Mapped[str] = mapped_column(String(64), primary_key=True)
    bonus_tokens: Mapped[int] = mapped_column()
    starts_at: Mapped[datetime | None] = mapped_column()
    ends_at: Mapped[datetime | None] = mapped_column()
    max_redemptions: Mapped[int | None] = mapped_column()  # global cap; None = unlimited
    redemptions: Mapped[int] = mapped_column(default=0)
    plan: Mapped[str | None] = mapped_column(String(32))  # only accounts on this plan
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class PromoRedemption(Base):
    __tablename__ = "promo_redemptions"
    __table_args__ = (UniqueConstraint("code", "account_id", name="uq_promo_once_per_account"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    code: Mapped[str] = mapped_column(String(64))
    account_id: Mapped[str] = mapped_column(String(128), index=True)
    bonus_tokens: Mapped[int] = mapped_column()
    transaction_id: Mapped[str | None] = mapped_column(String(160))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Project(Base):
    """A user's project; executing it runs the agents, each metered (reserve → run → settle)."""

    __tablename__ = "projects"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(128), index=True)
    title: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(String(5000))
    status: Mapped[str] = mapped_column(String(16), default="created")  # created running done stopped
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class PaymentEvent(Base):
    """A verified payment-provider event, recorded once: (provider, event_id) and (provider, kind,
    object_id) are unique, so a redelivered or replayed event changes nothing."""

    __tablename__ = "payment_events"
    __table_args__ = (
        UniqueConstraint("provider", "event_id", name="uq_payment_events_event"),
        UniqueConstraint("provider", "kind", "object_id", name="uq_payment_events_object"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    provider: Mapped[str] = mapped_column(String(32))
    event_id: Mapped[str] = mapped_column(String(128))
    event_type: Mapped[str] = mapped_column(String(64))  # the provider's name, e.g. payment.captured
    kind: Mapped[str] = mapped_column(String(16))  # paid failed refunded
    object_id: Mapped[str] = mapped_column(String(128))  # the payment (paid, failed) or refund id
    order_id: Mapped[str] = mapped_column(String(128))
    purchase_id: Mapped[str] = mapped_column(String(36), index=True)
    amount_paise: Mapped[int] = mapped_column()
    currency: Mapped[str] = mapped_column(String(3))
    refunded_paise: Mapped[int] = mapped_column(default=0)
    tokens: Mapped[int] = mapped_column(default=0)  # credited (paid) or taken back (refunded)
    outcome: Mapped[str] = mapped_column(String(32))  # credited failed refunded expired ignored
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
