"""Wiring: build the meter, the Redis client, the database and the flusher from Settings."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from redis.asyncio import Redis

from api.settings import Settings
from meter import Catalog, Meter, default_catalog, load_catalog
from persistence.db import Database
from persistence.flusher import Flusher, FlusherConfig
from persistence.ledger import LedgerWriter
from persistence.rehydrate import SnapshotLoader

__all__ = ["Runtime"]

log = logging.getLogger("tokenmeter")


async def _check_redis_config(redis: Redis) -> None:
    """Warn loudly about Redis settings that can lose or evict tokens (the meter still starts)."""
    try:
        cfg = await redis.config_get("maxmemory-policy")
        cfg.update(await redis.config_get("appendonly"))
    except Exception as exc:  # CONFIG may be disabled on managed Redis
        log.warning("could not read the Redis configuration (%s); make sure maxmemory-policy is noeviction", exc)
        return
    if cfg.get("maxmemory-policy") != "noeviction":
        log.error("REDIS maxmemory-policy is %r, not 'noeviction': Redis may EVICT balances and journal "
                  "entries under memory pressure. Set maxmemory-policy noeviction.", cfg.get("maxmemory-policy"))
    if cfg.get("appendonly") != "yes":
        log.warning("Redis appendonly is off: a Redis crash loses everything since the last snapshot; "
                    "recommended: appendonly yes, appendfsync everysec (or always)")


@dataclass
class Runtime:
    settings: Settings
    catalog: Catalog
    meter: Meter
    redis: Redis  # redis-py client on the meter's Redis (off the hot path)
    db: Database

    @classmethod
    async def start(cls, settings: Settings) -> Runtime:
        catalog = load_catalog(settings.catalog) if settings.catalog else default_catalog()
        if settings.strict_labels is not None:
            catalog = replace(catalog, strict_labels=settings.strict_labels)
        db = Database(settings.database_url)
        url = settings.redis_url or "fakeredis://"
        meter = await Meter.connect(url, timeout_ms=settings.redis_timeout_ms,
                                    connect_timeout_ms=settings.redis_connect_timeout_ms, catalog=catalog,
                                    shards=settings.shards, prefix=settings.key_prefix,
                                    hold_ttl_ms=settings.hold_ttl_ms, idempotency_ttl_s=settings.idempotency_ttl_s)
        redis: Redis = meter.redis
        if settings.redis_url:
            await _check_redis_config(redis)
        meter.loader = SnapshotLoader(db, redis, catalog, shards=settings.shards, prefix=settings.key_prefix,
                                      clock=meter.clock, idempotency_ttl_s=meter.idempotency_ttl_s)
        return cls(settings, catalog, meter, redis, db)

    def flusher(self, consumer: str = "") -> Flusher:
        s = self.settings
        config = FlusherConfig(consumer=consumer or s.flusher_consumer or "", batch=s.flusher_batch,
                               block_ms=s.flusher_block_ms, claim_idle_ms=s.flusher_claim_idle_ms,
                               max_deliveries=s.flusher_max_deliveries,
                               consumer_idle_delete_ms=s.flusher_consumer_idle_delete_ms)
        return Flusher(self.redis, LedgerWriter(self.db, self.catalog), shards=s.shards,
                       prefix=s.key_prefix, config=config)

    async def close(self) -> None:
        await self.meter.close()
        await self.db.close()
