"""Payments: verified provider events (each recorded once) and refund columns on purchases.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)
BIG = sa.BigInteger()
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.add_column("token_purchases", sa.Column("refunded_paise", BIG, nullable=False, server_default="0"))
    op.add_column("token_purchases", sa.Column("owed_tokens", BIG, nullable=False, server_default="0"))
    op.add_column("token_purchases", sa.Column("credit_transaction_id", sa.String(160), nullable=True))
    op.create_table(
        "payment_events",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("provider", sa.String(32), nullable=False),
        sa.Column("event_id", sa.String(128), nullable=False),
        sa.Column("event_type", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("object_id", sa.String(128), nullable=False),
        sa.Column("order_id", sa.String(128), nullable=False),
        sa.Column("purchase_id", sa.String(36), nullable=False),
        sa.Column("amount_paise", BIG, nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("refunded_paise", BIG, nullable=False),
        sa.Column("tokens", BIG, nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("received_at", TZ, nullable=False),
        sa.UniqueConstraint("provider", "event_id", name="uq_payment_events_event"),
        sa.UniqueConstraint("provider", "kind", "object_id", name="uq_payment_events_object"),
    )
    op.create_index("ix_payment_events_purchase_id", "payment_events", ["purchase_id"])


def downgrade() -> None:
    op.drop_index("ix_payment_events_purchase_id", table_name="payment_events")
    op.drop_table("payment_events")
    with op.batch_alter_table("token_purchases") as batch:
        batch.drop_column("credit_transaction_id")
        batch.drop_column("owed_tokens")
        batch.drop_column("refunded_paise")
