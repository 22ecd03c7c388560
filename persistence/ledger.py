"""Writing journal entries into the ledger tables, idempotently, in one transaction per batch.

Postgres: COPY into a temporary staging table, then INSERT ... SELECT ... ON CONFLICT
(transaction_id) DO NOTHING. SQLite: executemany INSERT ... ON CONFLICT DO NOTHING. In the same
transaction, each account's `token_balances` snapshot moves to its newest entry's state (the
newest `seq` wins, so batches may commit in any order and replays change nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from meter import Catalog, JournalEntry
from persistence.db import Database
from persistence.models import TokenBalance, TokenTransaction

__all__ = ["TX_COLUMNS", "DatabaseUnavailable", "LedgerWriter", "Row", "WriteResult", "entry_row"]

TX_COLUMNS = (
    "transaction_id", "account_id", "seq", "stream_id", "transaction_type", "tokens_before",
    "tokens_changed", "tokens_after", "held_changed", "held_after", "rollover_delta", "monthly_delta",
    "bonus_delta", "premium_delta", "agent_type", "model_used", "input_tokens", "output_tokens",
    "estimated_cost_usd_micros", "estimated_cost_inr_paise", "request_id", "project_id", "hold_id",
    "description", "reference", "created_at",
)
USAGE_KINDS = frozenset({"usage", "settle"})

Row = tuple[Any, ...]


class DatabaseUnavailable(Exception):
    """The database could not be reached; the batch was not written and may be retried."""


@dataclass(frozen=True, slots=True)
class WriteResult:
    inserted: int
    duplicates: int
    forks: list[str]  # transaction ids already stored from another stream entry


def entry_row(entry: JournalEntry, stream_id: str, catalog: Catalog) -> Row:
    """The token_transactions row of one journal entry; costs priced from the catalog now."""
    available_delta = entry.rollover + entry.monthly + entry.bonus + entry.premium
    usd = inr = 0
    if entry.kind in USAGE_KINDS and entry.model:
        used = -entry.delta
        if entry.input_tokens is None and entry.output_tokens is None:
            inp, out = 0, used  # no split given: priced as output, the conservative estimate
        else:
            inp, out = entry.input_tokens or 0, entry.output_tokens or 0
        usd = catalog.cost_usd_micros(entry.model, inp, out)
        inr = catalog.usd_micros_to_inr_paise(usd)
    return (
        entry.transaction_id, entry.account_id, entry.seq, stream_id, entry.kind,
        entry.available_before, available_delta, entry.available_after, entry.held, entry.held_after,
        entry.rollover, entry.monthly, entry.bonus, entry.premium,
        entry.agent or None, entry.model or None, entry.input_tokens, entry.output_tokens, usd, inr,
        entry.request_id or None, entry.project_id or None, entry.hold_id or None,
        entry.note or None, entry.reference or None,
        datetime.fromtimestamp(entry.ts_ms / 1000, tz=UTC),
    )


def _snapshots(entries: Sequence[JournalEntry]) -> list[dict[str, Any]]:
    newest: dict[str, JournalEntry] = {}
    for e in entries:
        if e.account_id not in newest or newest[e.account_id].seq < e.seq:
            newest[e.account_id] = e
    now = datetime.now(UTC)
    return [  # sorted by account: concurrent flushers lock rows in the same order (no deadlock)
        {"account_id": e.account_id, "plan": e.plan, "period": e.period,
         "rollover_tokens": e.rollover_after, "monthly_tokens": e.monthly_after,
         "bonus_tokens": e.bonus_after, "premium_tokens": e.premium_after,
         "reserved_tokens": e.held_after, "remaining_tokens": e.available_after,
         "used_tokens": e.used_after, "total_requests": e.requests_after, "seq": e.seq, "updated_at": now}
        for _, e in sorted(newest.items())
    ]


def _unavailable(exc: BaseException) -> bool:
    if isinstance(exc, OperationalError | InterfaceError | OSError | TimeoutError | ConnectionError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


class LedgerWriter:
    """Writes batches of (journal entry, stream id) to the database."""

    def __init__(self, db: Database, catalog: Catalog, *, use_copy: bool = True) -> None:
        self.db = db
        self.catalog = catalog
        self.use_copy = use_copy and db.is_postgres

    async def write(self, batch: Sequence[tuple[JournalEntry, str]]) -> WriteResult:
        """One transaction; raises DatabaseUnavailable when the database cannot be reached."""
        if not batch:
            return WriteResult(0, 0, [])
        rows = [entry_row(e, sid, self.catalog) for e, sid in batch]
        snaps = _snapshots([e for e, _ in batch])
        try:
            if self.use_copy:
                return await self._write_copy(rows, snaps)
            return await self._write_insert(rows, snaps)
        except Exception as exc:
            if _unavailable(exc):
                raise DatabaseUnavailable(str(exc)) from exc
            raise

    def _upsert_snapshots(self) -> Any:
        ins = (pg_insert if self.db.is_postgres else sqlite_insert)(TokenBalance)
        cols = {c.name: getattr(ins.excluded, c.name) for c in TokenBalance.__table__.columns
                if c.name != "account_id"}
        return ins.on_conflict_do_update(index_elements=["account_id"], set_=cols,
                                         where=TokenBalance.seq < ins.excluded.seq)

    async def _write_insert(self, rows: list[Row], snaps: list[dict[str, Any]]) -> WriteResult:
        ins = (pg_insert if self.db.is_postgres else sqlite_insert)(TokenTransaction)
        stmt = ins.on_conflict_do_nothing(index_elements=["transaction_id"])
        async with self.db.engine.begin() as conn:
            ids = [r[0] for r in rows]
            existing = await self._existing(conn, ids)
            fresh = [dict(zip(TX_COLUMNS, r, strict=True)) for r in rows if r[0] not in existing]
            if fresh:
                await conn.execute(stmt, fresh)
            await conn.execute(self._upsert_snapshots(), snaps)
        forks = [r[0] for r in rows if r[0] in existing and existing[r[0]] != r[3]]
        return WriteResult(len(fresh), len(rows) - len(fresh), forks)

    @staticmethod
    async def _existing(conn: Any, ids: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        tx = TokenTransaction.__table__
        for i in range(0, len(ids), 500):
            q = tx.select().with_only_columns(tx.c.transaction_id, tx.c.stream_id).where(
                tx.c.transaction_id.in_(ids[i:i + 500]))
            found.update({a: b for a, b in (await conn.execute(q)).all()})
        return found

    async def _write_copy(self, rows: list[Row], snaps: list[dict[str, Any]]) -> WriteResult:
        cols = ", ".join(TX_COLUMNS)
        snap_cols = list(snaps[0])
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in snap_cols if c != "account_id")
        async with self.db.engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            async with raw.transaction():  # one asyncpg transaction for everything below
                await raw.execute(
                    "CREATE TEMP TABLE IF NOT EXISTS tm_stage AS "
                    f"SELECT {cols} FROM token_transactions WITH NO DATA")
                await raw.execute("TRUNCATE tm_stage")
                await raw.copy_records_to_table("tm_stage", records=rows, columns=list(TX_COLUMNS))
                inserted = await raw.fetch(
                    f"INSERT INTO token_transactions ({cols}) SELECT {cols} FROM tm_stage "
                    "ON CONFLICT (transaction_id) DO NOTHING RETURNING transaction_id")
                forks: list[str] = []
                if len(inserted) < len(rows):
                    forks = [r[0] for r in await raw.fetch(
                        "SELECT s.transaction_id FROM tm_stage s JOIN token_transactions t "
                        "USING (transaction_id) WHERE t.stream_id <> s.stream_id")]
                placeholders = ", ".join(f"${i + 1}" for i in range(len(snap_cols)))
                await raw.executemany(
                    f"INSERT INTO token_balances ({', '.join(snap_cols)}) VALUES ({placeholders}) "
                    f"ON CONFLICT (account_id) DO UPDATE SET {updates} "
                    "WHERE token_balances.seq < EXCLUDED.seq",
                    [tuple(s[c] for c in snap_cols) for s in snaps])
        return WriteResult(len(inserted), len(rows) - len(inserted), forks)

    async def ping(self) -> None:
        async with self.db.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
