"""How far the ledger is behind the journal, per shard, read from Redis alone.

Any process can ask (the service, the flusher, `tokenmeter reconcile`): three pipelined round
trips for all shards (XINFO GROUPS, XPENDING, and XRANGE for the oldest undelivered entry
where nothing is pending). `BacklogMonitor` keeps the Prometheus gauges fresh, at most once a
second, so a scrape costs Redis nothing more.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from meter import keys as keyspace
from persistence import metrics

__all__ = ["DEFAULT_GROUP", "BacklogMonitor", "ShardBacklog", "backlog", "shard_backlog"]

DEFAULT_GROUP = "tm-flusher"


@dataclass(frozen=True, slots=True)
class ShardBacklog:
    """One shard's unflushed journal: entries delivered to a flusher but not acknowledged
    (`pending`), entries no flusher has read yet (`undelivered`), and the age of the oldest
    entry that is not acknowledged (0.0 when there is none)."""

    shard: int
    stream: str
    pending: int
    undelivered: int
    oldest_unacked_age_s: float
    group_exists: bool

    @property
    def unflushed(self) -> int:
        return self.pending + self.undelivered


def _entry_ms(entry_id: Any) -> int:
    raw = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return int(raw.split("-")[0])


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


async def shard_backlog(redis: Redis, streams: Sequence[str], *, group: str = DEFAULT_GROUP,
                        now_ms: int | None = None) -> list[ShardBacklog]:
    """The backlog of each stream in `streams` (index = shard) for consumer group `group`."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xinfo_groups(stream)
            pipe.xlen(stream)
        replies = await pipe.execute(raise_on_error=False)
    groups: list[dict[str, Any] | None] = []
    lengths: list[int] = []
    for i in range(len(streams)):
        info, length = replies[2 * i], replies[2 * i + 1]
        lengths.append(int(length) if isinstance(length, int) else 0)
        if isinstance(info, Exception):  # no such stream (deleted, FLUSHALL): nothing waits there
            groups.append(None)
            continue
        groups.append(next((g for g in info if _text(g.get("name")) == group), None))
    async with redis.pipeline(transaction=False) as pipe:
        for stream, g in zip(streams, groups, strict=True):
            if g is not None:
                pipe.xpending(stream, group)
        pend_replies = iter(await pipe.execute(raise_on_error=False))
    pendings: list[dict[str, Any] | None] = []
    for g in groups:
        p = next(pend_replies) if g is not None else None
        pendings.append(p if isinstance(p, dict) else None)
    # The oldest unacknowledged entry: the oldest pending one, else the first one after the
    # group's last delivered id (or the stream's first when no group exists yet).
    async with redis.pipeline(transaction=False) as pipe:
        asked: list[int] = []
        for i, (stream, g, p) in enumerate(zip(streams, groups, pendings, strict=True)):
            if p and p.get("pending"):
                continue
            if g is None and lengths[i] == 0:
                continue
            start = "-" if g is None else f"({_text(g.get('last-delivered-id', '0-0'))}"
            pipe.xrange(stream, min=start, count=1)
            asked.append(i)
        first_after = dict(zip(asked, await pipe.execute(raise_on_error=False), strict=True))
    out: list[ShardBacklog] = []
    for i, (stream, g, p) in enumerate(zip(streams, groups, pendings, strict=True)):
        pending = int(p["pending"]) if p else 0
        oldest: Any = p["min"] if p and pending else None
        nxt = first_after.get(i)
        if oldest is None and isinstance(nxt, list) and nxt:
            oldest = nxt[0][0]
        if g is None:
            undelivered = lengths[i]
        else:
            lag = g.get("lag")  # Redis 7+: entries not yet delivered to the group
            undelivered = int(lag) if isinstance(lag, int) else (1 if oldest is not None and not pending else 0)
        age = max((now_ms - _entry_ms(oldest)) / 1000, 0.0) if oldest is not None else 0.0
        out.append(ShardBacklog(i, stream, pending, undelivered, age, g is not None))
    return out


async def backlog(redis: Redis, *, shards: int = keyspace.DEFAULT_SHARDS, prefix: str = keyspace.PREFIX,
                  group: str = DEFAULT_GROUP, now_ms: int | None = None) -> list[ShardBacklog]:
    """Per shard: pending count, undelivered count and the age of the oldest unacknowledged
    journal entry (what `tokenmeter reconcile` can warn about when it is stale)."""
    return await shard_backlog(redis, [keyspace.journal_key(s, prefix) for s in range(shards)], group=group,
                               now_ms=now_ms)


class BacklogMonitor:
    """Sets the `tokenmeter_flusher_pending_entries`, `_undelivered_entries` and `_lag_seconds`
    gauges from Redis, at most once per `max_age_s` (a scrape in between reuses the values)."""

    def __init__(self, redis: Redis, streams: Sequence[str], *, group: str = DEFAULT_GROUP,
                 max_age_s: float = 1.0) -> None:
        self.redis, self.streams, self.group, self.max_age_s = redis, list(streams), group, max_age_s
        self.last: list[ShardBacklog] = []
        self._at = 0.0

    async def refresh(self) -> list[ShardBacklog]:
        if self.last and time.monotonic() - self._at < self.max_age_s:
            return self.last
        self.last = await shard_backlog(self.redis, self.streams, group=self.group)
        self._at = time.monotonic()
        for b in self.last:
            shard = str(b.shard)
            metrics.PENDING.labels(shard=shard).set(b.pending)
            metrics.UNDELIVERED.labels(shard=shard).set(b.undelivered)
            metrics.LAG_SECONDS.labels(shard=shard).set(b.oldest_unacked_age_s)
        return self.last
