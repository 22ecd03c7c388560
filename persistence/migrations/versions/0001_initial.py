"""Initial schema: accounts, api keys, balances, transactions, purchases, promo codes.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)
BIG = sa.BigInteger()
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("email", sa.String(320), nullable=True, unique=True),
        sa.Column("password_hash", sa.String(255), nullable=True),
        sa.Column("plan", sa.String(32), nullable=False),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("scopes", sa.String(128), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("revoked_at", TZ, nullable=True),
    )
    op.create_table(
        "token_balances",
        sa.Column("account_id", sa.String(128), primary_key=True),
        sa.Column("plan", sa.String(32), nullable=False),
        *(sa.Column(name, BIG, nullable=False) for name in (
            "period", "rollover_tokens", "monthly_tokens", "bonus_tokens", "premium_tokens",
            "reserved_tokens", "remaining_tokens", "used_tokens", "total_requests", "seq")),
        sa.Column("updated_at", TZ, nullable=False),
    )
    op.create_table(
        "token_transactions",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("transaction_id", sa.String(160), nullable=False, unique=True),
        sa.Column("account_id", sa.String(128), nullable=False),
        sa.Column("seq", BIG, nullable=False),
        sa.Column("stream_id", sa.String(40), nullable=False),
        sa.Column("transaction_type", sa.String(20), nullable=False),
        *(sa.Column(name, BIG, nullable=False) for name in (
            "tokens_before", "tokens_changed", "tokens_after", "held_changed", "held_after",
            "rollover_delta", "monthly_delta", "bonus_delta", "premium_delta")),
        sa.Column("agent_type", sa.String(64), nullable=True),
        sa.Column("model_used", sa.String(64), nullable=True),
        sa.Column("input_tokens", BIG, nullable=True),
        sa.Column("output_tokens", BIG, nullable=True),
        sa.Column("estimated_cost_usd_micros", BIG, nullable=False),
        sa.Column("estimated_cost_inr_paise", BIG, nullable=False),
        sa.Column("request_id", sa.String(255), nullable=True),
        sa.Column("project_id", sa.String(128), nullable=True),
        sa.Column("hold_id", sa.String(20), nullable=True),
        sa.Column("description", sa.String(500), nullable=True),
        sa.Column("reference", sa.String(255), nullable=True),
        sa.Column("created_at", TZ, nullable=False),
    )
    op.create_index("ix_token_transactions_account_time", "token_transactions", ["account_id", "created_at"])
    op.create_index("ix_token_transactions_account_agent", "token_transactions",
                    ["account_id", "agent_type", "created_at"])
    op.create_index("ix_token_transactions_model_time", "token_transactions", ["model_used", "created_at"])
    op.create_table(
        "token_purchases",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("account_id", sa.String(128), nullable=False),
        sa.Column("package_id", sa.String(32), nullable=False),
        sa.Column("tokens", BIG, nullable=False),
        sa.Column("amount_paise", BIG, nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("provider", sa.String(32), nullable=False),
        sa.Column("provider_order_id", sa.String(128), nullable=True, unique=True),
        sa.Column("provider_payment_id", sa.String(128), nullable=True),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("refunded_tokens", BIG, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("paid_at", TZ, nullable=True),
        sa.UniqueConstraint("account_id", "idempotency_key", name="uq_purchase_idempotency"),
    )
    op.create_index("ix_token_purchases_account_id", "token_purchases", ["account_id"])
    op.create_table(
        "promo_codes",
        sa.Column("code", sa.String(64), primary_key=True),
        sa.Column("bonus_tokens", BIG, nullable=False),
        sa.Column("starts_at", TZ, nullable=True),
        sa.Column("ends_at", TZ, nullable=True),
        sa.Column("max_redemptions", BIG, nullable=True),
        sa.Column("redemptions", BIG, nullable=False),
        sa.Column("plan", sa.String(32), nullable=True),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
    )
    op.create_table(
        "promo_redemptions",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("code", sa.String(64), nullable=False),
        sa.Column("account_id", sa.String(128), nullable=False),
        sa.Column("bonus_tokens", BIG, nullable=False),
        sa.Column("transaction_id", sa.String(160), nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.UniqueConstraint("code", "account_id", name="uq_promo_once_per_account"),
    )
    op.create_index("ix_promo_redemptions_account_id", "promo_redemptions", ["account_id"])


def downgrade() -> None:
    op.drop_index("ix_promo_redemptions_account_id", table_name="promo_redemptions")
    op.drop_table("promo_redemptions")
    op.drop_table("promo_codes")
    op.drop_index("ix_token_purchases_account_id", table_name="token_purchases")
    op.drop_table("token_purchases")
    op.drop_index("ix_token_transactions_model_time", table_name="token_transactions")
    op.drop_index("ix_token_transactions_account_agent", table_name="token_transactions")
    op.drop_index("ix_token_transactions_account_time", table_name="token_transactions")
    op.drop_table("token_transactions")
    op.drop_table("token_balances")
    op.drop_table("api_keys")
    op.drop_table("accounts")
