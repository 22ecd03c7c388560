"""The only module that spells a Redis key.

Every key of an account carries the hash tag of its shard, `tm:{s<k>}:...` with
`k = crc32(account_id) mod shards`, so one script touches one cluster slot and a Redis
Cluster spreads the shards over its nodes. The shard's journal stream is `tm:{s<k>}:journal`.
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

__all__ = ["DEFAULT_SHARDS", "PREFIX", "AccountKeys", "account_keys", "idempotency_key", "journal_key",
           "live_key", "promo_failures_key", "shard_of", "shard_tag", "sweep_key"]

PREFIX = "tm"
DEFAULT_SHARDS = 64


class AccountKeys(NamedTuple):
    """The KEYS of every account script, in the order the Lua files expect them."""

    account: str  # hash: plan limits, buckets, counters, journal sequence
    holds: str  # hash: hold id -> "tokens:r:m:b:p:period:expires_ms"
    hold_expiry: str  # zset: hold id scored by expiry
    sweep: str  # shard zset: account id scored by its earliest hold expiry
    journal: str  # shard stream of journal entries
    idempotency: str  # string: fingerprint + stored reply, 24 h


def shard_of(account_id: str, shards: int = DEFAULT_SHARDS) -> int:
    return zlib.crc32(account_id.encode()) % shards


def shard_tag(shard: int, prefix: str = PREFIX) -> str:
    return f"{prefix}:{{s{shard}}}"


def journal_key(shard: int, prefix: str = PREFIX) -> str:
    return f"{shard_tag(shard, prefix)}:journal"


def sweep_key(shard: int, prefix: str = PREFIX) -> str:
    return f"{shard_tag(shard, prefix)}:sweep"


def live_key(shard: int, prefix: str = PREFIX) -> str:
    """Set of the shard's accounts verified against the ledger since Redis started (in Redis
    memory only, never in the AOF: see lua/_wallet.lua mark_live)."""
    return f"{shard_tag(shard, prefix)}:live"


def idempotency_key(account_id: str, request_id: str, *, shards: int = DEFAULT_SHARDS, prefix: str = PREFIX) -> str:
    """The stored answer of the call with this request id (today's encoding, as account_keys)."""
    return f"{shard_tag(shard_of(account_id, shards), prefix)}:idem:{account_id}:{request_id}"


def promo_failures_key(account_id: str, *, shards: int = DEFAULT_SHARDS, prefix: str = PREFIX) -> str:
    """Counter of an account's failed promo-code attempts in the current window."""
    return f"{shard_tag(shard_of(account_id, shards), prefix)}:promofail:{account_id}"


def account_keys(
    account_id: str, request_id: str = "", *, shards: int = DEFAULT_SHARDS, prefix: str = PREFIX
) -> AccountKeys:
    shard = shard_of(account_id, shards)
    tag = shard_tag(shard, prefix)
    return AccountKeys(
        account=f"{tag}:a:{account_id}",
        holds=f"{tag}:h:{account_id}",
        hold_expiry=f"{tag}:hx:{account_id}",
        sweep=f"{tag}:sweep",
        journal=f"{tag}:journal",
        idempotency=f"{tag}:idem:{account_id}:{request_id}",
    )
