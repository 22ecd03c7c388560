"""The flusher: journal streams in Redis → the ledger in the database, every entry exactly once.

Loop (one consumer group, any number of flusher processes sharing it):
XREADGROUP a batch from every shard's stream → write it in one database transaction,
idempotent by transaction id → COMMIT → XACK → now and then XTRIM each stream below its
oldest unacknowledged entry (never MAXLEN: that would drop unflushed entries).
Entries a dead consumer left pending are taken over with XAUTOCLAIM; an entry delivered more
than `max_deliveries` times, or one that cannot be parsed or written, goes to the dead-letter
stream with the reason, a log line and a metric — never dropped silently. Database down,
restarting or refusing (any transient fault, persistence.db.is_transient): retry with capped
backoff, nothing acked; only a configuration error (authentication, no such database) ends the
loop (DatabaseMisconfigured). Redis down: wait and resume. A stream or group that vanished
(FLUSHALL, DEL: NOGROUP, "UNBLOCKED the stream key no longer exists"): create the groups again.

The consumer name is stable (the host name by default, or --consumer), so a restarted flusher
reads its own pending entries at once instead of waiting claim_idle_ms for a claim; consumers
idle past consumer_idle_delete_ms with nothing pending are removed from the groups.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis import exceptions as rexc
from redis.asyncio import Redis

from meter import keys as keyspace
from meter.keys import dead_letter_key
from persistence import metrics
from persistence.backlog import BacklogMonitor, shard_backlog
from persistence.db import DatabaseMisconfigured, is_configuration_error, is_transient
from persistence.flusher_config import FlusherConfig, FlusherStats, FlusherStopped, default_consumer, tune_gc
from persistence.ledger import (
    DatabaseUnavailable,
    LedgerWriter,
    Prepared,
    RowsRejected,
    WriteResult,
    prepare,
)
from persistence.streams import Entry, as_is, lost_group, parse_entries, remove_idle_consumers, trim_streams

__all__ = ["Flusher", "FlusherConfig", "FlusherStats", "FlusherStopped", "dead_letter_key", "default_consumer",
           "tune_gc"]

log = logging.getLogger("tokenmeter.flusher")

_REDIS_DOWN = (rexc.ConnectionError, rexc.TimeoutError, OSError)


class Flusher:
    """Moves journal entries from every shard stream into the ledger."""

    def __init__(self, redis: Redis, writer: LedgerWriter, *, shards: int = keyspace.DEFAULT_SHARDS,
                 prefix: str = keyspace.PREFIX, config: FlusherConfig | None = None) -> None:
        self.redis = redis
        self.writer = writer
        self.prefix = prefix
        self.config = config or FlusherConfig()
        if not self.config.consumer:
            self.config.consumer = default_consumer()
        self.streams = [keyspace.journal_key(s, prefix) for s in range(shards)]
        # XREADGROUP with its reply as Redis sent it (same connection pool): redis-py's
        # conversion, a dict built in Python per entry, was the flusher's largest cost.
        self._raw = Redis(connection_pool=redis.connection_pool)
        self._raw.set_response_callback("XREADGROUP", as_is)
        self.dead_letter = dead_letter_key(prefix)
        self.stats = FlusherStats()
        self._ready = False
        self._own_pending_done = False
        self._last_claim = 0.0
        self._last_trim = 0.0
        self._last_consumer_gc = 0.0
        self._last_gauges = 0.0
        self.monitor = BacklogMonitor(redis, self.streams, group=self.config.group,
                                      max_age_s=self.config.gauges_every_s)
        self._stop = asyncio.Event()
        self._prefetch: asyncio.Future[list[Entry]] | None = None

    # -- setup -----------------------------------------------------------------------------------

    async def setup(self) -> None:
        """Create the consumer group on every stream (MKSTREAM); only BUSYGROUP is ignored."""
        for stream in self.streams:
            try:
                await self.redis.xgroup_create(stream, self.config.group, id="0", mkstream=True)
            except rexc.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._ready = True

    # -- the loop --------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Flush until `stop` is set; survives Redis and database outages."""
        stop = self._stop = stop or asyncio.Event()
        delay = 0.05
        while not stop.is_set():
            try:
                if not self._ready:
                    await self.setup()
                await self.step()
                delay = 0.05
            except FlusherStopped:
                break
            except rexc.ResponseError as exc:
                if not lost_group(exc):
                    raise
                log.warning("journal stream or consumer group gone (%s): creating the groups again", exc)
                self.stats.groups_recreated += 1
                metrics.GROUPS_RECREATED.inc()
                self._ready = False
                self._own_pending_done = False
                self._drop_prefetch()
                await _sleep_or_stop(stop, 0.05)
            except _REDIS_DOWN as exc:
                log.warning("redis unavailable, retrying in %.2fs: %s", delay, exc)
                await _sleep_or_stop(stop, delay)
                delay = min(delay * 2, self.config.backoff_max_s)
                self._ready = False
                # Entries read (or written) but not acknowledged before the outage are still
                # pending on this consumer: read them again first (rows are idempotent).
                self._own_pending_done = False
        await self._finish()

    def _drop_prefetch(self) -> None:
        """Forget a read-ahead (its entries stay pending, or are gone with their stream)."""
        if self._prefetch is not None:
            prefetch, self._prefetch = self._prefetch, None
            if not prefetch.done():
                prefetch.cancel()
            elif not prefetch.cancelled():
                prefetch.exception()  # retrieved: no "exception never retrieved" warning

    async def _finish(self) -> None:
        """Write what a read-ahead already took (else it waits, pending, for a restart or a claim)."""
        if self._prefetch is None:
            return
        prefetch, self._prefetch = self._prefetch, None
        try:
            await self._process(await prefetch)
        except (FlusherStopped, rexc.ResponseError, *_REDIS_DOWN) as exc:
            log.warning("stopping with read entries unwritten (they stay pending): %s", exc)

    async def step(self) -> int:
        """One round: own pending (after a restart), claims, a new batch, maybe a trim."""
        done = 0
        if not self._own_pending_done:
            done += await self._process(await self._read("0"))
            self._own_pending_done = True
        now = time.monotonic()
        if now - self._last_claim >= self.config.claim_every_s:
            self._last_claim = now
            done += await self._claim()
        if self._prefetch is None:
            self._prefetch = asyncio.ensure_future(self._read(">", block=self.config.block_ms))
        try:
            entries = await self._prefetch
        finally:
            self._prefetch = None
        if entries:  # a backlog: read the next batch while this one is written
            self._prefetch = asyncio.ensure_future(self._read(">", block=self.config.block_ms))
        done += await self._process(entries)
        now = time.monotonic()
        if now - self._last_trim >= self.config.trim_every_s:
            self._last_trim = now
            await self.trim()
        if now - self._last_consumer_gc >= self.config.consumer_gc_every_s:
            self._last_consumer_gc = now
            await self._housekeeping(self.remove_idle_consumers)
        if now - self._last_gauges >= self.config.gauges_every_s:
            self._last_gauges = now
            await self._housekeeping(self.monitor.refresh)
        return done

    async def _housekeeping(self, fn: Any) -> None:
        """Consumer clean-up and gauges: a Redis that refuses them must not stop the flushing."""
        try:
            await fn()
        except rexc.ResponseError as exc:
            if lost_group(exc):
                raise
            log.warning("flusher housekeeping (%s) failed: %s", getattr(fn, "__name__", fn), exc)

    async def drain(self, idle_rounds: int = 2) -> int:
        """Flush until the streams have nothing new (for tests, tools and benchmarks)."""
        total, idle = 0, 0
        if not self._ready:
            await self.setup()
        while idle < idle_rounds:
            n = await self.step()
            total += n
            idle = idle + 1 if n == 0 else 0
        assert self._prefetch is None  # an idle round reads ahead nothing
        return total

    # -- reading ---------------------------------------------------------------------------------

    async def _read(self, start: str, block: int | None = None) -> list[Entry]:
        args: list[str | int] = ["GROUP", self.config.group, self.config.consumer,
                                 "COUNT", max(1, self.config.batch // 16)]
        if block is not None:
            args += ["BLOCK", block]
        send: Callable[..., Awaitable[Any]] = self._raw.execute_command  # untyped in redis-py
        return parse_entries(await send(
            "XREADGROUP", *args, "STREAMS", *self.streams, *[start] * len(self.streams)))

    async def _claim(self) -> int:
        """Take over entries idle past claim_idle_ms (their consumer died); poison → dead letter."""
        done = 0
        for stream in self.streams:
            start = "0-0"
            for _ in range(100):  # bounded: at most 100 pages per stream per round
                nxt, claimed, *_ = await self.redis.xautoclaim(
                    stream, self.config.group, self.config.consumer, self.config.claim_idle_ms,
                    start_id=start, count=self.config.batch)
                entries = [(stream, eid, f) for eid, f in claimed if f is not None]
                if entries:
                    done += await self._process_claimed(stream, entries)
                if nxt in ("0-0", b"0-0"):
                    break
                start = nxt
        return done

    async def _process_claimed(self, stream: str, entries: list[Entry]) -> int:
        info = await self.redis.xpending_range(stream, self.config.group, min=entries[0][1],
                                               max=entries[-1][1], count=len(entries) + 10,
                                               consumername=self.config.consumer)
        deliveries = {p["message_id"]: int(p["times_delivered"]) for p in info}
        poison = [e for e in entries if deliveries.get(e[1], 0) > self.config.max_deliveries]
        if poison:
            await self._dead_letter(poison, f"delivered more than {self.config.max_deliveries} times")
        ok = [e for e in entries if deliveries.get(e[1], 0) <= self.config.max_deliveries]
        return await self._process(ok)

    # -- writing ---------------------------------------------------------------------------------

    async def _process(self, entries: list[Entry]) -> int:
        """Write entries in batches, up to `writers` transactions in flight on separate database
        connections while the next batch is prepared (snapshots are newest-seq-wins and rows are
        idempotent, so batches may commit in any order)."""
        done = 0
        inflight: list[asyncio.Task[int]] = []
        try:
            for i in range(0, len(entries), self.config.batch):
                batch = await self._prepare(entries[i:i + self.config.batch])
                if len(inflight) >= self.config.writers:
                    done += await inflight.pop(0)
                inflight.append(asyncio.ensure_future(self._write_batch(*batch)))
            while inflight:
                done += await inflight.pop(0)
        finally:  # one batch failed (or stopped): the others end too, their entries unacknowledged
            for task in inflight:
                task.cancel()
            await asyncio.gather(*inflight, return_exceptions=True)
        return done

    async def _prepare(self, entries: Sequence[Entry]) -> tuple[list[Entry], list[Prepared]]:
        """Rows of the well-formed entries; malformed ones go to the dead-letter stream. Yields to
        the event loop every few hundred rows so a batch in flight keeps talking to the database."""
        prepared: list[Prepared] = []
        good: list[Entry] = []
        for n, e in enumerate(entries, 1):
            try:
                prepared.append(prepare(e[2], e[1], self.writer.catalog))
                good.append(e)
            except (KeyError, ValueError) as exc:
                await self._dead_letter([e], f"malformed entry: {exc!r}")
            if n % 250 == 0:
                await asyncio.sleep(0)
        return good, prepared

    async def _write_batch(self, good: list[Entry], prepared: list[Prepared]) -> int:
        if not prepared:
            return 0
        try:
            result = await self._write(prepared)
        except RowsRejected as exc:  # the database refused some row: isolate it, keep the rest
            if len(good) == 1:
                await self._dead_letter(good, f"database rejected the entry: {exc!r}")
                return 0
            log.warning("batch rejected (%r); writing its %d entries one by one", exc, len(good))
            return sum([await self._write_batch([e], [p]) for e, p in zip(good, prepared, strict=True)])
        forks = set(result.forks)
        if forks:
            forked = [e for e, (row, _) in zip(good, prepared, strict=True) if row[0] in forks]
            await self._dead_letter(forked,
                                    "transaction id already stored from another stream entry "
                                    "(Redis lost acknowledged data)")
            self.stats.forks += sorted(forks)
            metrics.FORKS.inc(len(forks))
            good = [e for e, (row, _) in zip(good, prepared, strict=True) if row[0] not in forks]
        await self._ack(good)
        self.stats.flushed += result.inserted
        self.stats.duplicates += result.duplicates
        self.stats.batches += 1
        metrics.FLUSHED.inc(result.inserted)
        metrics.DUPLICATES.inc(result.duplicates)
        metrics.BATCH_SIZE.observe(len(prepared))
        return len(prepared)

    async def _write(self, parsed: list[Prepared]) -> WriteResult:
        """Write one batch, retrying with capped backoff through any transient database fault
        (down, restarting, shutting down, too many clients, serialization failure). A
        configuration error (authentication, no such database) raises DatabaseMisconfigured."""
        delay = 0.05
        while True:
            try:
                return await self.writer.write(parsed)
            except RowsRejected:
                raise
            except Exception as exc:
                if is_configuration_error(exc):
                    raise DatabaseMisconfigured(f"the database refuses the flusher: {exc}") from exc
                if not (isinstance(exc, DatabaseUnavailable) or is_transient(exc)):
                    raise
                if self._stop.is_set():
                    raise FlusherStopped(f"stopped while the database is unavailable: {exc}") from exc
                self.stats.db_retries += 1
                metrics.DB_ERRORS.inc()
                log.warning("database unavailable, retrying batch of %d in %.2fs: %s",
                            len(parsed), delay, exc)
                await _sleep_or_stop(self._stop, delay)
                delay = min(delay * 2, self.config.backoff_max_s)

    async def _ack(self, entries: Sequence[Entry]) -> None:
        by_stream: dict[str, list[str]] = defaultdict(list)
        for stream, eid, _ in entries:
            by_stream[stream].append(eid)
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream, ids in by_stream.items():
                pipe.xack(stream, self.config.group, *ids)
            await pipe.execute()

    async def _dead_letter(self, entries: Sequence[Entry], reason: str) -> None:
        for stream, eid, fields in entries:
            log.error("dead-lettering journal entry %s %s: %s", stream, eid, reason)
            await self.redis.xadd(self.dead_letter, {"stream": stream, "id": eid, "reason": reason,
                                                     "fields": json.dumps(fields)})
            await self.redis.xack(stream, self.config.group, eid)
            metrics.DEAD_LETTERS.labels(reason=reason.split(":")[0][:40]).inc()
        self.stats.dead_letters += len(entries)

    # -- trimming and lag ------------------------------------------------------------------------

    async def trim(self) -> None:
        """XTRIM each stream below its oldest pending entry (or its last delivered one)."""
        await trim_streams(self.redis, self.streams, self.config.group)

    async def lag(self) -> dict[str, Any]:
        """Pending count and oldest unflushed entry age over all shards."""
        shards = await shard_backlog(self.redis, self.streams, group=self.config.group)
        return {"pending": sum(b.pending for b in shards),
                "oldest_unflushed_seconds": max((b.oldest_unacked_age_s for b in shards), default=0.0)}

    async def remove_idle_consumers(self) -> list[str]:
        """Remove other consumers idle past consumer_idle_delete_ms with nothing pending."""
        removed = await remove_idle_consumers(self.redis, self.streams, self.config.group,
                                              keep=self.config.consumer,
                                              idle_ms=self.config.consumer_idle_delete_ms)
        if removed:
            log.info("removed %d idle consumer entries (pending none): %s", len(removed), ", ".join(removed[:10]))
            metrics.CONSUMERS_REMOVED.inc(len(removed))
            self.stats.consumers_removed += removed
        return removed


async def _sleep_or_stop(stop: asyncio.Event, delay: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)
