"""Did the wallet already make this change? The ledger's answer, for the money paths that credit
inside a database transaction (promo codes, pack purchases, paid plans).

Such a path credits Redis (idempotently, by request id) and then commits its own row. If that
commit fails after the credit, the credit stands and reaches the ledger, but the row does not
exist; a retry within 24 h is a replay of the stored answer, and after that only the ledger
knows. So the path asks the ledger first and, when it finds the change, records it instead of
making it again: exactly once rests on the database, never on the idempotency key's TTL. (A
change still in the journal stream when its idempotency key expires would need a flusher stopped
for a whole day; `tokenmeter reconcile` reports that long before.)
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from persistence.models import TokenTransaction

__all__ = ["journaled_change"]


async def journaled_change(session: AsyncSession, account_id: str, request_id: str) -> str | None:
    """The transaction id of the change the request id `request_id` made on the account, if the
    ledger holds it (the account's rows only: the table's key starts with the account)."""
    found = await session.execute(select(TokenTransaction.transaction_id).where(
        TokenTransaction.account_id == account_id, TokenTransaction.request_id == request_id).limit(1))
    return found.scalar_one_or_none()
