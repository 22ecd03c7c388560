"""The journal streams' upkeep in Redis, for the flusher: raw XREADGROUP replies as entries,
a vanished group recognised, streams trimmed below what is unflushed, dead consumers removed."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from redis import exceptions as rexc
from redis.asyncio import Redis

__all__ = ["Entry", "as_is", "lost_group", "parse_entries", "remove_idle_consumers", "trim_streams"]

log = logging.getLogger("tokenmeter.flusher")

Entry = tuple[str, str, dict[str, str]]  # (stream key, entry id, fields)


def as_is(response: Any, **_: Any) -> Any:  # named as redis-py's ResponseCallbackProtocol
    return response


def parse_entries(reply: Any) -> list[Entry]:
    """(stream, id, fields) of a raw XREADGROUP reply: a map of stream → entries (RESP3) or a
    list of [stream, entries] (RESP2); an entry is [id, [field, value, ...]], or [id, nil] when
    it was deleted while pending (nothing to write: skipped)."""
    if not reply:
        return []
    out: list[Entry] = []
    for stream, entries in reply.items() if isinstance(reply, dict) else reply:
        for eid, flat in entries:
            if flat is not None:
                it = iter(flat)
                out.append((stream, eid, dict(zip(it, it, strict=False))))  # Redis keeps fields in pairs
    return out


def lost_group(exc: rexc.ResponseError) -> bool:
    """The stream or its consumer group no longer exists (FLUSHALL, DEL of the stream, a
    blocked XREADGROUP unblocked by the deletion)."""
    text = str(exc)
    return "NOGROUP" in text or "UNBLOCKED" in text or "no longer exists" in text


async def trim_streams(redis: Redis, streams: Sequence[str], group: str) -> None:
    """XTRIM each stream below its oldest pending entry (or its last delivered one); never a
    stream another group also reads (it may still need older entries)."""
    for stream in streams:
        try:
            groups = await redis.xinfo_groups(stream)
        except rexc.ResponseError:  # no such stream (yet, or any more): nothing to trim
            continue
        g = next((g for g in groups if g["name"] == group), None)
        if g is None or len(groups) > 1:
            continue
        pending = await redis.xpending(stream, group)
        boundary = pending["min"] if pending["pending"] else g["last-delivered-id"]
        if boundary and boundary != "0-0":
            await redis.xtrim(stream, minid=boundary, approximate=False)


async def remove_idle_consumers(redis: Redis, streams: Sequence[str], group: str, *, keep: str,
                                idle_ms: int) -> list[str]:
    """XGROUP DELCONSUMER every consumer but `keep` idle past `idle_ms` with no pending
    entries (names of dead flushers; with stable names there are few). Returns 'stream/name's."""
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xinfo_consumers(stream, group)
        replies = await pipe.execute(raise_on_error=False)
    removed: list[str] = []
    for stream, consumers in zip(streams, replies, strict=True):
        if isinstance(consumers, Exception):  # no stream or group here
            continue
        for c in consumers:
            name = c["name"].decode() if isinstance(c["name"], bytes) else str(c["name"])
            if name == keep or int(c["pending"]) or int(c["idle"]) < idle_ms:
                continue
            lost = await redis.xgroup_delconsumer(stream, group, name)
            if lost:  # it read entries between XINFO and now: a live flusher after all
                log.error("removed consumer %s on %s had %s pending entries: they are redelivered "
                          "only by a rewind (XGROUP SETID); run `tokenmeter reconcile`", name, stream, lost)
            removed.append(f"{stream}/{name}")
    return removed
