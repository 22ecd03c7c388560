"""Writing journal entries into the ledger tables, idempotently, in one transaction per batch.

Postgres: COPY straight into the table under a savepoint (the common case: a new batch); if
any row is already stored, the savepoint is rolled back and the batch is COPYed into a
temporary staging table, then INSERT ... SELECT ... ON CONFLICT (account_id, seq) DO NOTHING
(the table's key: the transaction id "<account>:<seq>" is the same identity).
SQLite: executemany INSERT ... ON CONFLICT DO NOTHING. In the same transaction each account's
`token_balances` snapshot moves to its newest entry's state (the newest `seq` wins, so batches
may commit in any order and replays change nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import asyncpg
from sqlalchemy import text, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, InterfaceError, OperationalError

from meter import Catalog
from meter import _wire as wire
from persistence.db import Database
from persistence.metrics import UNPRICED
from persistence.models import TokenBalance, TokenTransaction

__all__ = [
    "TX_COLUMNS",
    "DatabaseUnavailable",
    "LedgerWriter",
    "Prepared",
    "Row",
    "RowsRejected",
    "WriteResult",
    "prepare",
]

TX_COLUMNS = (
    "transaction_id", "account_id", "seq", "stream_id", "transaction_type", "tokens_before",
    "tokens_changed", "tokens_after", "held_changed", "held_after", "rollover_delta", "monthly_delta",
    "bonus_delta", "premium_delta", "agent_type", "model_used", "input_tokens", "output_tokens",
    "estimated_cost_usd_micros", "estimated_cost_inr_paise", "request_id", "project_id", "hold_id",
    "description", "reference", "created_at", "idempotency_record", "hold_expires_ms",
)
USAGE_KINDS = frozenset({"usage", "settle"})

Row = tuple[Any, ...]


class DatabaseUnavailable(Exception):
    """The database could not be reached; the batch was not written and may be retried."""


class RowsRejected(Exception):
    """The database refused the data (a constraint or value error); nothing was written."""


@dataclass(frozen=True, slots=True)
class WriteResult:
    inserted: int
    duplicates: int
    forks: list[str]  # transaction ids already stored from another stream entry


Prepared = tuple[Row, str]  # (token_transactions row, the entry's state field "st")


def prepare(fields: dict[str, str], stream_id: str, catalog: Catalog) -> Prepared:
    """The row of one raw stream entry (KeyError/ValueError when malformed); costs priced now.

    Works on the raw fields rather than a JournalEntry: this is the flusher's inner loop, so it
    is written for speed (map/int on the split fields, timestamps cached per millisecond). The
    balances after the change come from the state field 'st'.
    """
    get = fields.get
    seq, ts, dr, dm, db, dp, dh = wire.parse_numbers(fields)
    state = fields["st"]
    kind = fields["t"]
    after, held = wire.balances_after(state)  # all of 'st' is parsed for the newest entry only
    moved = dr + dm + db + dp
    given_in, given_out, model = get("in"), get("ou"), get("mo")
    inp = None if given_in is None else int(given_in)
    out = None if given_out is None else int(given_out)
    usd = inr = 0
    if model and kind in USAGE_KINDS:
        if inp is None and out is None:  # no split given: priced as output, the conservative estimate
            usd = catalog.cost_usd_micros(model, 0, -(moved + dh))
        else:
            usd = catalog.cost_usd_micros(model, inp or 0, out or 0)
        if not usd and not catalog.is_priced(model):
            UNPRICED.inc()
        inr = catalog.usd_micros_to_inr_paise(usd)
    account = fields["a"]
    row = (f"{account}:{seq}", account, seq, stream_id, kind, after - moved, moved, after, dh,
           held, dr, dm, db, dp, get("ag"), model, inp, out, usd, inr,
           get("rq"), get("pj"), get("hl"), get("nt"), get("rf"), _moment(ts), get("ik"),
           wire.hold_expiry(get("hx"), get("nt")) if kind == "hold" else None)
    return row, state


@lru_cache(maxsize=4_096)
def _moment(ms: int) -> datetime:
    """The datetime of a millisecond timestamp; cached: a batch's entries share a few thousand."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _snapshots(batch: Sequence[Prepared]) -> list[dict[str, Any]]:
    newest: dict[str, Prepared] = {}
    for p in batch:
        account, seq = p[0][1], p[0][2]
        if account not in newest or newest[account][0][2] < seq:
            newest[account] = p
    now = datetime.now(UTC)
    snaps = []
    for account, (row, state) in sorted(newest.items()):  # sorted: concurrent flushers lock alike
        s = wire.parse_state(state)  # entries written before the daily counters parse with 0s
        snaps.append({"account_id": account, "plan": s.plan, "period": s.per, "rollover_tokens": s.r,
                      "monthly_tokens": s.m, "bonus_tokens": s.b, "premium_tokens": s.p,
                      "reserved_tokens": s.h, "remaining_tokens": row[7], "used_tokens": s.used,
                      "total_requests": s.treq, "seq": row[2], "updated_at": now,
                      "day_index": s.day, "requests_today": s.rq, "tokens_used_today": s.ut})
    return snaps


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

    async def write(self, batch: Sequence[Prepared]) -> WriteResult:
        """One transaction; raises DatabaseUnavailable when the database cannot be reached."""
        if not batch:
            return WriteResult(0, 0, [])
        rows = [row for row, _ in batch]
        snaps = _snapshots(batch)
        try:
            if self.use_copy:
                return await self._write_copy(rows, snaps)
            return await self._write_insert(rows, snaps)
        except Exception as exc:
            if _unavailable(exc):
                raise DatabaseUnavailable(str(exc)) from exc
            if isinstance(exc, DataError | IntegrityError | asyncpg.DataError
                          | asyncpg.IntegrityConstraintViolationError):
                raise RowsRejected(str(exc)) from exc
            raise

    def _upsert_snapshots(self) -> Any:
        ins = (pg_insert if self.db.is_postgres else sqlite_insert)(TokenBalance)
        cols = {c.name: getattr(ins.excluded, c.name) for c in TokenBalance.__table__.columns
                if c.name != "account_id"}
        return ins.on_conflict_do_update(index_elements=["account_id"], set_=cols,
                                         where=TokenBalance.seq < ins.excluded.seq)

    async def _write_insert(self, rows: list[Row], snaps: list[dict[str, Any]]) -> WriteResult:
        ins = (pg_insert if self.db.is_postgres else sqlite_insert)(TokenTransaction)
        stmt = ins.on_conflict_do_nothing(index_elements=["account_id", "seq"])
        async with self.db.engine.begin() as conn:
            existing = await self._existing(conn, rows)
            fresh = [dict(zip(TX_COLUMNS, r, strict=True)) for r in rows if r[0] not in existing]
            if fresh:
                await conn.execute(stmt, fresh)
            await conn.execute(self._upsert_snapshots(), snaps)
        forks = [r[0] for r in rows if r[0] in existing and existing[r[0]] != r[3]]
        return WriteResult(len(fresh), len(rows) - len(fresh), forks)

    @staticmethod
    async def _existing(conn: Any, rows: list[Row]) -> dict[str, str]:
        """transaction id → stream id of the rows already stored (looked up by the key)."""
        found: dict[str, str] = {}
        tx = TokenTransaction.__table__
        for i in range(0, len(rows), 400):
            keys = [(r[1], r[2]) for r in rows[i:i + 400]]
            q = tx.select().with_only_columns(tx.c.transaction_id, tx.c.stream_id).where(
                tuple_(tx.c.account_id, tx.c.seq).in_(keys))
            found.update({a: b for a, b in (await conn.execute(q)).all()})
        return found

    async def _write_copy(self, rows: list[Row], snaps: list[dict[str, Any]]) -> WriteResult:
        cols = ", ".join(TX_COLUMNS)
        snap_cols = list(snaps[0])
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in snap_cols if c != "account_id")
        async with self.db.engine.connect() as conn:
            raw = _asyncpg_connection((await conn.get_raw_connection()).driver_connection)
            async with raw.transaction():  # one asyncpg transaction for everything below
                await raw.execute(  # temp tables live as long as the connection
                    f"CREATE TEMP TABLE IF NOT EXISTS tm_stage AS SELECT {cols} FROM token_transactions "
                    "WITH NO DATA; CREATE TEMP TABLE IF NOT EXISTS tm_snap_stage AS SELECT "
                    f"{', '.join(snap_cols)} FROM token_balances WITH NO DATA; "
                    "TRUNCATE tm_stage, tm_snap_stage")
                forks: list[str] = []
                try:
                    # Optimistic: almost every batch is new, so COPY straight into the table
                    # (half the database work of staging). Any already-stored row makes the
                    # COPY fail as a whole; then the savepoint is rolled back and the batch goes
                    # through the staging table with ON CONFLICT DO NOTHING.
                    async with raw.transaction():
                        await raw.copy_records_to_table("token_transactions", records=rows,
                                                        columns=list(TX_COLUMNS))
                    inserted = len(rows)
                except asyncpg.UniqueViolationError:
                    await raw.copy_records_to_table("tm_stage", records=rows, columns=list(TX_COLUMNS))
                    status = await raw.execute(
                        f"INSERT INTO token_transactions ({cols}) SELECT {cols} FROM tm_stage "
                        "ON CONFLICT (account_id, seq) DO NOTHING")
                    inserted = int(status.rsplit(" ", 1)[1])
                    if inserted < len(rows):
                        forks = [r[0] for r in await raw.fetch(
                            "SELECT s.transaction_id FROM tm_stage s JOIN token_transactions t "
                            "USING (account_id, seq) WHERE t.stream_id <> s.stream_id")]
                await raw.copy_records_to_table("tm_snap_stage", columns=snap_cols,
                                                records=[tuple(s[c] for c in snap_cols) for s in snaps])
                await raw.execute(
                    f"INSERT INTO token_balances ({', '.join(snap_cols)}) SELECT {', '.join(snap_cols)} "
                    f"FROM tm_snap_stage ON CONFLICT (account_id) DO UPDATE SET {updates} "
                    "WHERE token_balances.seq < EXCLUDED.seq")
        return WriteResult(inserted, len(rows) - inserted, forks)

    async def ping(self) -> None:
        async with self.db.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))


def _asyncpg_connection(driver_connection: object) -> asyncpg.Connection:
    """The asyncpg connection under SQLAlchemy's (the COPY path is used only on PostgreSQL)."""
    if not isinstance(driver_connection, asyncpg.Connection):
        raise TypeError(f"the COPY path needs an asyncpg connection, got {type(driver_connection).__name__}")
    return driver_connection
