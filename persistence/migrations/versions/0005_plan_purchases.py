"""Paid plans are bought like packs: a purchase has a kind (pack | plan), the plan and the period
(month index) it pays for and the plan it replaced (restored on refund); accounts record when an
admin last set their plan (admin plans are not lapsed for want of payment).

Plain ADD COLUMNs (nullable or with a server default), which SQLite supports in place.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("token_purchases", sa.Column("kind", sa.String(8), nullable=False, server_default="pack"))
    op.add_column("token_purchases", sa.Column("plan_id", sa.String(32), nullable=True))
    op.add_column("token_purchases", sa.Column("period", sa.BigInteger(), nullable=True))
    op.add_column("token_purchases", sa.Column("previous_plan", sa.String(32), nullable=True))
    op.add_column("accounts", sa.Column("admin_plan_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("admin_plan_at")
    with op.batch_alter_table("token_purchases") as batch:
        batch.drop_column("previous_plan")
        batch.drop_column("period")
        batch.drop_column("plan_id")
        batch.drop_column("kind")
