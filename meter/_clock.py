"""Time is passed in: pure code takes `now_ms`; the clock is injectable (tests use FakeClock)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol

__all__ = ["DAY_MS", "Clock", "FakeClock", "SystemClock", "day_index", "month_end_ms", "month_index"]

DAY_MS = 86_400_000


class Clock(Protocol):
    def now_ms(self) -> int: ...


class SystemClock:
    """Wall-clock time in integer milliseconds since the Unix epoch (UTC)."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now_ms: int = 1_767_225_600_000) -> None:  # 2026-01-01T00:00:00Z
        self._now = now_ms

    def now_ms(self) -> int:
        return self._now

    def set(self, now_ms: int) -> None:
        self._now = now_ms

    def advance(self, ms: int) -> None:
        self._now += ms


def _utc(now_ms: int) -> datetime:
    return datetime.fromtimestamp(now_ms // 1000, tz=UTC)


def month_index(now_ms: int) -> int:
    """Calendar month (UTC) as a counter: year * 12 + month - 1."""
    t = _utc(now_ms)
    return t.year * 12 + t.month - 1


def day_index(now_ms: int) -> int:
    """Calendar day (UTC) as days since the epoch."""
    return now_ms // DAY_MS


def month_end_ms(month: int) -> int:
    """First millisecond of the month after `month` (a `month_index`)."""
    year, m0 = divmod(month + 1, 12)
    return int(datetime(year, m0 + 1, 1, tzinfo=UTC).timestamp()) * 1000
