"""Reconcile: compare every account's Redis balance with the ledger in the database.

For each shard, one MULTI/EXEC reads the journal stream and the accounts' balances atomically;
the database is read in one REPEATABLE READ transaction. An account's ledger is the sum of its
stored transactions up to Redis's sequence number plus the stream entries not yet stored.
Available + held in Redis must equal it. Transactions stored beyond Redis's sequence mean
Redis lost acknowledged data (the AOF loss window): reported per account as the entries and
tokens Redis lost, never hidden; `repair` loads the ledger's state into Redis for those accounts
(the load script journals it). `backlog` finds journal entries stuck in the streams (a dead
flusher): pending or not yet delivered, older than a threshold.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from redis.asyncio import Redis
from sqlalchemy import bindparam, func, select

from meter import JournalEntry, Meter
from meter import keys as keyspace
from persistence.backlog import DEFAULT_GROUP, ShardBacklog, backlog
from persistence.db import Database
from persistence.models import TokenBalance, TokenTransaction
from persistence.rehydrate import Progress

__all__ = ["AccountCheck", "format_backlog", "format_report", "reconcile", "repair", "stale_backlog"]


@dataclass(frozen=True, slots=True)
class AccountCheck:
    account_id: str
    redis_total: int | None  # available + held; None when the account is not in Redis
    ledger_total: int
    unflushed: int  # stream entries not yet in the database
    ledger_ahead: int  # stored transactions newer than Redis's state: entries Redis lost
    lost_tokens: int = 0  # their net change of available + held (what Redis's balance misses)

    @property
    def drift(self) -> int:
        return (self.redis_total or 0) - self.ledger_total

    @property
    def status(self) -> str:
        if self.redis_total is None:
            return "missing in redis (run rehydrate)"
        if self.ledger_ahead:
            return (f"redis lost {self.ledger_ahead} entries / {self.lost_tokens} tokens "
                    "(behind the ledger; run reconcile --repair)")
        return "drift" if self.drift else "ok"

    @property
    def ok(self) -> bool:
        return self.status == "ok"


async def reconcile(redis: Redis, db: Database, *, shards: int = keyspace.DEFAULT_SHARDS,
                    prefix: str = keyspace.PREFIX,
                    progress: Callable[[int], Progress] | None = None) -> list[AccountCheck]:
    async with db.sessions() as session:
        known = list((await session.execute(select(TokenBalance.account_id))).scalars())
    by_shard: dict[int, set[str]] = defaultdict(set)
    for account_id in known:
        by_shard[keyspace.shard_of(account_id, shards)].add(account_id)
    for shard in range(shards):
        async for key in redis.scan_iter(match=keyspace.account_key_pattern(shard, prefix), count=1000):
            by_shard[shard].add(keyspace.account_of_key(key))
    bar = (progress or (lambda n: Progress("reconcile", n)))(sum(len(v) for v in by_shard.values()))
    checks: list[AccountCheck] = []
    for shard, accounts in sorted(by_shard.items()):
        checks += await _check_shard(redis, db, shard, sorted(accounts), shards, prefix)
        bar.advance(len(accounts))
    return checks


async def _check_shard(redis: Redis, db: Database, shard: int, accounts: list[str], shards: int,
                       prefix: str) -> list[AccountCheck]:
    async with redis.pipeline(transaction=True) as pipe:  # one atomic view of stream + balances
        pipe.xrange(keyspace.journal_key(shard, prefix))
        for account_id in accounts:
            pipe.hmget(keyspace.account_keys(account_id, shards=shards, prefix=prefix).account,
                       "r", "m", "b", "p", "h", "seq")
        stream, *states = await pipe.execute()
    pending: dict[str, list[JournalEntry]] = defaultdict(list)
    for _, fields in stream:
        if fields.get("a") in accounts:
            pending[fields["a"]].append(JournalEntry.from_fields(fields))
    out = []
    async with db.engine.connect() as conn:
        if db.is_postgres:
            conn = await conn.execution_options(isolation_level="REPEATABLE READ")
        async with conn.begin():
            tx = TokenTransaction.__table__
            total_q = select(func.coalesce(func.sum(tx.c.tokens_changed + tx.c.held_changed), 0),
                             func.count()).where(tx.c.account_id == bindparam("a"),
                                                 tx.c.seq <= bindparam("s"))
            ahead_q = select(func.count(), func.coalesce(func.sum(tx.c.tokens_changed + tx.c.held_changed), 0)
                             ).where(tx.c.account_id == bindparam("a"), tx.c.seq > bindparam("s"))
            for account_id, state in zip(accounts, states, strict=True):
                in_redis = state[0] is not None
                seq = int(state[5] or 0) if in_redis else 2**62
                stored_total = int((await conn.execute(total_q, {"a": account_id, "s": seq})).one()[0])
                ahead, lost = (int(x) for x in (await conn.execute(ahead_q, {"a": account_id, "s": seq})).one())
                entries = [e for e in pending.get(account_id, []) if e.seq <= seq]
                stored = set()
                if entries:
                    stored = set((await conn.execute(select(tx.c.transaction_id).where(
                        tx.c.account_id == account_id, tx.c.seq.in_([e.seq for e in entries])))).scalars())
                unflushed = [e for e in entries if e.transaction_id not in stored]
                redis_total = sum(int(x or 0) for x in state[:5]) if in_redis else None
                ledger = stored_total + sum(e.delta for e in unflushed)
                out.append(AccountCheck(account_id, redis_total, ledger, len(unflushed), ahead, lost))
    return out


def format_report(checks: list[AccountCheck], *, show_all: bool = False) -> str:
    rows = [c for c in checks if show_all or not c.ok]
    lines = [f"{'account':<40} {'redis':>14} {'ledger':>14} {'drift':>10} {'unflushed':>9}  status"]
    for c in rows:
        redis_total = "-" if c.redis_total is None else str(c.redis_total)
        lines.append(f"{c.account_id[:40]:<40} {redis_total:>14} {c.ledger_total:>14} {c.drift:>10} "
                     f"{c.unflushed:>9}  {c.status}")
    bad = sum(1 for c in checks if not c.ok)
    lines.append(f"{len(checks)} accounts checked, {bad} with drift")
    return "\n".join(lines)


async def repair(meter: Meter, checks: list[AccountCheck], *, apply: bool = False) -> list[str]:
    """Make Redis agree with the ledger for every account Redis lacks or lost entries of: the
    ledger's state is loaded (balance, holds, daily counters, idempotency records; the load
    script journals it and the sequence moves past the ledger's last id). A dry run (the
    default) only says what it would do. Lines to print, one per account."""
    lines = []
    for c in checks:
        if c.redis_total is not None and not c.ledger_ahead:
            continue  # plain drift is not Redis behind the ledger: loading would not fix it
        what = "missing" if c.redis_total is None else f"{c.ledger_ahead} entries / {c.lost_tokens} tokens lost"
        if not apply:
            lines.append(f"would load {c.account_id} from the ledger ({what}); --apply to do it")
            continue
        loaded = await meter.rehydrate(c.account_id)
        lines.append(f"{'loaded' if loaded else 'left'} {c.account_id} ({what})")
    return lines


async def stale_backlog(redis: Redis, *, older_than_s: float, group: str = DEFAULT_GROUP,
                        shards: int = keyspace.DEFAULT_SHARDS, prefix: str = keyspace.PREFIX) -> list[ShardBacklog]:
    """The shards whose oldest journal entry not yet in the ledger (pending in `group`, or never
    delivered) is older than `older_than_s`: a flusher stopped or stuck. Ages against Redis's clock."""
    sec, usec = await redis.time()
    found = await backlog(redis, shards=shards, prefix=prefix, group=group, now_ms=int(sec) * 1000 + int(usec) // 1000)
    return [b for b in found if b.unflushed and b.oldest_unacked_age_s >= older_than_s]


def format_backlog(found: list[ShardBacklog], older_than_s: float) -> str:
    if not found:
        return ""
    total = sum(b.unflushed for b in found)
    worst = max(b.oldest_unacked_age_s for b in found)
    lines = [f"WARNING: {total} journal entries not yet in the ledger, the oldest {worst:.0f}s old (over "
             f"{older_than_s:g}s) in {len(found)} streams: is the flusher running?"]
    lines += [f"  {b.stream}: {b.pending} pending, {b.undelivered} never read, oldest {b.oldest_unacked_age_s:.0f}s"
              for b in found]
    return "\n".join(lines)
