"""The flusher's settings, counters and process tuning (persistence/flusher.py runs the loop)."""

from __future__ import annotations

import gc
import socket
from dataclasses import dataclass, field

__all__ = ["FlusherConfig", "FlusherStats", "FlusherStopped", "default_consumer", "tune_gc"]


def tune_gc() -> None:
    """For a process whose work is flushing (`tokenmeter flusher`): Python's cyclic collector,
    run every 700 container allocations by default, re-traverses each batch's hundreds of
    thousands of young objects again and again: about a fifth of the flusher's time. Freezing
    what exists at start and letting 50,000 allocations pass between young collections took one
    flusher from ~42k to ~55k rows/s (loadtests/bench_flusher.py), for a few MB of memory."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


class FlusherStopped(Exception):
    """Asked to stop while a batch could not be written yet (the database is down): the batch
    stays pending, unacknowledged, for the next start or a claim."""


def default_consumer(suffix: str = "") -> str:
    """The same name on every start of the same deployment: the host name (a container's
    hostname is fixed per service replica), plus a suffix for the in-process flusher."""
    return socket.gethostname() + (f"-{suffix}" if suffix else "")


@dataclass(slots=True)
class FlusherConfig:
    group: str = "tm-flusher"
    consumer: str = ""  # default: default_consumer() (stable across restarts)
    # Entries per database transaction; each XREADGROUP asks every stream for batch // 16.
    # Large on purpose: a batch also upserts the snapshot of every account in it, so with many
    # accounts the snapshot work per row falls as the batch grows (2,000 -> 8,000 took one
    # flusher from ~47k to ~70k rows/s in loadtests/bench_flusher.py).
    batch: int = 8_000
    block_ms: int = 200
    claim_idle_ms: int = 30_000  # pending this long → its consumer is presumed dead
    claim_every_s: float = 5.0
    max_deliveries: int = 5
    writers: int = 2  # database transactions in flight at once
    trim_every_s: float = 5.0
    backoff_max_s: float = 5.0
    # A consumer this idle with nothing pending is gone for good (an old name): removed from
    # the groups. Far above claim_idle_ms and any live flusher's idle (a read every block_ms).
    consumer_idle_delete_ms: int = 3_600_000
    consumer_gc_every_s: float = 60.0
    gauges_every_s: float = 1.0  # backlog gauges from Redis (persistence/backlog.py)


@dataclass(slots=True)
class FlusherStats:
    flushed: int = 0
    duplicates: int = 0
    batches: int = 0
    dead_letters: int = 0
    forks: list[str] = field(default_factory=list)
    db_retries: int = 0
    groups_recreated: int = 0
    consumers_removed: list[str] = field(default_factory=list)
