"""Prometheus metrics of the flusher (exposed by the HTTP service's /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = ["BATCH_SIZE", "DB_ERRORS", "DEAD_LETTERS", "DUPLICATES", "FLUSHED", "FORKS", "LAG_SECONDS",
           "PENDING"]

FLUSHED = Counter("tokenmeter_flusher_entries_flushed_total", "Journal entries written to the database")
DUPLICATES = Counter("tokenmeter_flusher_duplicates_total", "Entries already in the database (redelivered)")
FORKS = Counter("tokenmeter_flusher_forks_total",
                "Entries whose transaction id was already stored from another stream entry")
DEAD_LETTERS = Counter("tokenmeter_flusher_dead_letters_total", "Entries moved to the dead-letter stream",
                       ["reason"])
DB_ERRORS = Counter("tokenmeter_flusher_db_unavailable_total", "Batches retried: database unreachable")
BATCH_SIZE = Histogram("tokenmeter_flusher_batch_size", "Entries per database transaction",
                       buckets=(1, 10, 100, 500, 1000, 2000, 5000, 10000))
PENDING = Gauge("tokenmeter_flusher_pending_entries", "Delivered but unacknowledged entries", ["shard"])
LAG_SECONDS = Gauge("tokenmeter_flusher_lag_seconds", "Age of the oldest unflushed journal entry", ["shard"])
