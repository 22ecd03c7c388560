"""Prometheus metrics of the flusher: counters of the process that flushes (the service's /metrics
for the in-process flusher, `tokenmeter flusher --metrics-port` for the external one) and
backlog gauges any process computes from Redis (persistence/backlog.py)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = ["BATCH_SIZE", "CONSUMERS_REMOVED", "DB_ERRORS", "DEAD_LETTERS", "DUPLICATES", "FLUSHED", "FORKS",
           "GROUPS_RECREATED", "LAG_SECONDS", "PENDING", "UNDELIVERED", "UNPRICED"]

FLUSHED = Counter("tokenmeter_flusher_entries_flushed_total", "Journal entries written to the database")
DUPLICATES = Counter("tokenmeter_flusher_duplicates_total", "Entries already in the database (redelivered)")
FORKS = Counter("tokenmeter_flusher_forks_total",
                "Entries whose transaction id was already stored from another stream entry")
DEAD_LETTERS = Counter("tokenmeter_flusher_dead_letters_total", "Entries moved to the dead-letter stream",
                       ["reason"])
DB_ERRORS = Counter("tokenmeter_flusher_db_unavailable_total",
                    "Batch writes retried: a transient database fault (down, restarting, too many clients)")
BATCH_SIZE = Histogram("tokenmeter_flusher_batch_size", "Entries per database transaction",
                       buckets=(1, 10, 100, 500, 1000, 2000, 5000, 10000))
PENDING = Gauge("tokenmeter_flusher_pending_entries", "Delivered but unacknowledged entries", ["shard"])
LAG_SECONDS = Gauge("tokenmeter_flusher_lag_seconds", "Age of the oldest unacknowledged journal entry", ["shard"])
UNDELIVERED = Gauge("tokenmeter_flusher_undelivered_entries", "Journal entries no flusher has read yet", ["shard"])
GROUPS_RECREATED = Counter("tokenmeter_flusher_groups_recreated_total",
                           "Consumer groups created again after a stream or group vanished (FLUSHALL, DEL)")
CONSUMERS_REMOVED = Counter("tokenmeter_flusher_consumers_removed_total",
                            "Idle consumers without pending entries removed from the groups")
UNPRICED = Counter("tokenmeter_unpriced_usage_total",
                   "Usage entries written with a model the catalog does not price (costed 0)")
