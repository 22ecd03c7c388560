"""A hold's expiry gets its own field: token_transactions.hold_expires_ms (the journal's 'hx').

Before, the reserve script wrote the expiry only into the note ('expires N', kept in
description) and rehydration read it back from there. Rows written before this revision keep
that note, which rehydration still reads when the column is NULL. Additive and nullable.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("token_transactions") as batch:
        batch.add_column(sa.Column("hold_expires_ms", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("token_transactions") as batch:
        batch.drop_column("hold_expires_ms")
