"""What rehydration needs after a Redis loss: the daily counters in the snapshot and the stored
idempotency answer of each call in the ledger.

token_balances gains day_index, requests_today, tokens_used_today (the counters as of the
snapshot's seq; a rehydrated account keeps its daily cap). token_transactions gains
idempotency_record (the journal entry's 'ik': fingerprint + reply), so a retry after the loss
is answered from the stored reply instead of being charged again. All additive, nullable or
defaulted: old rows and old journal entries stay valid.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

COUNTERS = ("day_index", "requests_today", "tokens_used_today")


def upgrade() -> None:
    with op.batch_alter_table("token_balances") as batch:
        for name in COUNTERS:
            batch.add_column(sa.Column(name, sa.BigInteger(), nullable=False, server_default="0"))
    with op.batch_alter_table("token_transactions") as batch:
        batch.add_column(sa.Column("idempotency_record", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("token_transactions") as batch:
        batch.drop_column("idempotency_record")
    with op.batch_alter_table("token_balances") as batch:
        for name in COUNTERS:
            batch.drop_column(name)
