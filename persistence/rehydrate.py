"""Rehydration: rebuild an account missing from Redis from the database snapshot, brought up to
date with any newer entry still in the journal stream (entries carry the full state after them),
with its open holds (ledger and stream: 'hold' entries with no settle or release yet), its daily
counters and the idempotency records of its calls of the last 24 h (from the ledger), so after a
Redis loss the daily cap does not start over and a retry is answered, not charged again.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from redis.asyncio import Redis
from sqlalchemy import String, cast, exists, select

from meter import Catalog, JournalEntry, Meter
from meter import _wire as wire
from meter import keys as keyspace
from meter._clock import Clock, SystemClock, month_index
from persistence import replies
from persistence.db import Database
from persistence.models import TokenBalance, TokenTransaction

__all__ = ["Progress", "SnapshotLoader", "rehydrate_all"]


class Progress:
    """A one-line progress bar on stderr (only when stderr is a terminal or forced)."""

    def __init__(self, label: str, total: int, *, enabled: bool | None = None) -> None:
        self.label, self.total, self.done = label, total, 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.enabled and (self.done == self.total or self.done % 100 == 0):
            width = 30
            filled = width * self.done // max(self.total, 1)
            sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
                             f"{self.done}/{self.total}")
            if self.done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


class SnapshotLoader:
    """`Meter(loader=SnapshotLoader(...))`: an account's fields from the database and stream."""

    def __init__(self, db: Database, redis: Redis, catalog: Catalog, *,
                 shards: int = keyspace.DEFAULT_SHARDS, prefix: str = keyspace.PREFIX,
                 clock: Clock | None = None, idempotency_ttl_s: int = wire.IDEMPOTENCY_TTL_S) -> None:
        self.db, self.redis, self.catalog = db, redis, catalog
        self.idempotency_ttl_s = idempotency_ttl_s  # the meter's retention: which answers come back
        self.shards, self.prefix = shards, prefix
        self.clock = clock or SystemClock()  # the meter's: the age of a stored idempotency record

    async def __call__(self, account_id: str) -> dict[str, str | int] | None:
        async with self.db.sessions() as session:
            snap = await session.get(TokenBalance, account_id)
        newest = await self._newest_in_stream(account_id, snap.seq if snap else 0)
        if newest is not None:
            state: dict[str, Any] = {
                "plan": newest.plan, "per": newest.period, "r": newest.rollover_after,
                "m": newest.monthly_after, "b": newest.bonus_after, "p": newest.premium_after,
                "h": newest.held_after, "used": newest.used_after, "treq": newest.requests_after,
                "seq": newest.seq, "day": newest.day, "rq": newest.requests_today, "ut": newest.tokens_used_today}
        elif snap is not None:
            state = {"plan": snap.plan, "per": snap.period, "r": snap.rollover_tokens,
                     "m": snap.monthly_tokens, "b": snap.bonus_tokens, "p": snap.premium_tokens,
                     "h": snap.reserved_tokens, "used": snap.used_tokens, "treq": snap.total_requests,
                     "seq": snap.seq, "day": snap.day_index, "rq": snap.requests_today,
                     "ut": snap.tokens_used_today}
        else:
            return None
        plan = self.catalog.plans.get(state["plan"]) or self.catalog.plan("free")
        state.update(allow=plan.monthly_tokens, dcap=plan.daily_requests, rpm=plan.requests_per_minute,
                     maxreq=plan.max_tokens_per_request, rpct=plan.rollover_pct, tat=0, created=0,
                     mg=0)  # granted this month: not in the ledger; 0 = the allowance (lua/wallet_plan.lua)
        # the daily counters as they were: the load script keeps them, the next touch clears
        # them if their day is over
        if state["h"]:
            for hid, record in (await self._open_holds(account_id)).items():
                state[f"hold:{hid}"] = record
        for request_id, record in (await self._idempotency_records(account_id)).items():
            state[f"idem:{request_id}"] = record
        return state

    async def _idempotency_records(self, account_id: str) -> dict[str, str]:
        """'<ttl_s>:<record>' by request id: the stored answers of the account's calls within the
        retention (24 h by default; their ledger rows carry the record), each for what is left of it."""
        now_ms = self.clock.now_ms()
        retention = self.idempotency_ttl_s
        since = datetime.fromtimestamp((now_ms - retention * 1000) / 1000, tz=UTC)
        tx = TokenTransaction.__table__
        query = select(tx.c.request_id, tx.c.idempotency_record, tx.c.created_at).where(
            tx.c.account_id == account_id, tx.c.created_at > since, tx.c.idempotency_record.is_not(None),
            tx.c.request_id.is_not(None))
        out: dict[str, str] = {}
        async with self.db.engine.connect() as conn:
            for request_id, record, at in (await conn.execute(query)).all():
                ttl_s = retention - (now_ms - _ms(at)) // 1000
                if ttl_s > 0:
                    out[request_id] = f"{ttl_s}:{record}"
        return out

    async def _open_holds(self, account_id: str) -> dict[str, str]:
        """The account's holds neither settled nor released, from the ledger and the stream, as
        hold records (meter/_wire.py Hold) by hold id (the 'hold' entry's seq).
        The load script restores them only if they add up to the held balance."""
        tx, closer = TokenTransaction.__table__.alias("h"), TokenTransaction.__table__.alias("c")
        closing = ("settle", "release")
        query = select(tx).where(tx.c.account_id == account_id, tx.c.transaction_type == "hold", ~exists().where(
            closer.c.account_id == account_id, closer.c.hold_id == cast(tx.c.seq, String),
            closer.c.transaction_type.in_(closing)))
        opened: dict[str, str | None] = {}
        async with self.db.engine.connect() as conn:
            for row in (await conn.execute(query)).mappings():
                opened[str(row["seq"])] = _hold_record(
                    row["held_changed"], row["rollover_delta"], row["monthly_delta"], row["bonus_delta"],
                    row["premium_delta"], _ms(row["created_at"]),
                    wire.hold_expiry(row["hold_expires_ms"], row["description"]))
            closed: set[str] = set()
            in_stream: dict[str, str | None] = {}
            for e in await self._entries_in_stream(account_id):
                if e.kind == "hold":
                    in_stream[str(e.seq)] = _hold_record(e.held, e.rollover, e.monthly, e.bonus, e.premium,
                                                         e.ts_ms, e.hold_expires_ms)
                elif e.kind in closing and e.hold_id:
                    closed.add(e.hold_id)
            fresh = [hid for hid in in_stream if hid not in opened]
            if fresh:  # held in the stream; maybe closed in the ledger already
                closed.update((await conn.execute(select(closer.c.hold_id).where(
                    closer.c.account_id == account_id, closer.c.hold_id.in_(fresh),
                    closer.c.transaction_type.in_(closing)))).scalars())
        holds = {**opened, **in_stream}
        return {hid: rec for hid, rec in holds.items() if hid not in closed and rec is not None}

    async def _entries_in_stream(self, account_id: str) -> list[JournalEntry]:
        stream = keyspace.journal_key(keyspace.shard_of(account_id, self.shards), self.prefix)
        out, start = [], "-"
        while True:
            page = await self.redis.xrange(stream, min=start, max="+", count=1000) or []
            out += [JournalEntry.from_fields(replies.fields(f)) for _, f in page if f and f.get("a") == account_id]
            if len(page) < 1000:
                return out
            start = f"({replies.text(page[-1][0])}"

    async def _newest_in_stream(self, account_id: str, after_seq: int) -> JournalEntry | None:
        stream = keyspace.journal_key(keyspace.shard_of(account_id, self.shards), self.prefix)
        last = "+"
        while True:
            page = await self.redis.xrevrange(stream, max=last, min="-", count=1000) or []
            for _, fields in page:
                if fields and fields.get("a") == account_id:
                    entry = JournalEntry.from_fields(replies.fields(fields))
                    return entry if entry.seq > after_seq else None
            if len(page) < 1000:
                return None
            last = f"({replies.text(page[-1][0])}"


def _ms(at: datetime) -> int:
    if at.tzinfo is None:  # SQLite hands back naive UTC
        at = at.replace(tzinfo=UTC)
    return (at - _EPOCH) // timedelta(milliseconds=1)


def _hold_record(tokens: int, dr: int, dm: int, db: int, dp: int, at_ms: int, expires: int | None) -> str | None:
    """A hold's record from its 'hold' journal entry (None when its expiry is unknown)."""
    if expires is None:
        return None
    return wire.Hold(tokens, -dr, -dm, -db, -dp, month_index(at_ms), expires).encode()


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


async def rehydrate_all(meter: Meter, db: Database, *, progress: Callable[[int], Progress] | None = None
                        ) -> int:
    """Load every account the database knows and Redis lacks or is behind on (and verify the
    others); returns how many were loaded."""
    async with db.sessions() as session:
        ids = list((await session.execute(select(TokenBalance.account_id))).scalars())
    bar = (progress or (lambda n: Progress("rehydrate", n)))(len(ids))
    loaded = 0
    for account_id in ids:
        if await meter.rehydrate(account_id):
            loaded += 1
        bar.advance()
    return loaded
