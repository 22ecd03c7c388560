"""The only module that spells a Redis key.

Every key of an account carries the hash tag of its shard, `tm:{s<k>}:...` with
`k = crc32(account_id) mod shards`, so one script touches one cluster slot and a Redis
Cluster spreads the shards over its nodes. The shard's journal stream is `tm:{s<k>}:journal`.
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

__all__ = ["DEFAULT_SHARDS", "PREFIX", "AccountKeys", "LoginKeys", "account_key_pattern", "account_keys",
           "account_of_key", "dead_letter_key", "idempotency_key",
           "journal_key",
           "live_key", "login_keys", "promo_failures_key", "registration_address_key", "registration_global_key",
           "revoked_api_key_key", "shard_of", "shard_tag", "stream_slots_key", "sweep_key"]

PREFIX = "tm"
DEFAULT_SHARDS = 64


class AccountKeys(NamedTuple):
    """The KEYS of every account script, in the order the Lua files expect them."""

    account: str  # hash: plan limits, buckets, counters, journal sequence
    holds: str  # hash: hold id -> "tokens:r:m:b:p:period:expires_ms"
    hold_expiry: str  # zset: hold id scored by expiry
    sweep: str  # shard zset: account id scored by its earliest hold expiry
    journal: str  # shard stream of journal entries
    idempotency: str  # string: fingerprint + stored reply, 24 h (see idempotency_key)


def shard_of(account_id: str, shards: int = DEFAULT_SHARDS) -> int:
    return zlib.crc32(account_id.encode()) % shards


def shard_tag(shard: int, prefix: str = PREFIX) -> str:
    return f"{prefix}:{{s{shard}}}"


def journal_key(shard: int, prefix: str = PREFIX) -> str:
    return f"{shard_tag(shard, prefix)}:journal"


def dead_letter_key(prefix: str = PREFIX) -> str:
    """Stream of the journal entries the flusher could not write (with the reason)."""
    return f"{prefix}:deadletter"


def sweep_key(shard: int, prefix: str = PREFIX) -> str:
    return f"{shard_tag(shard, prefix)}:sweep"


def live_key(shard: int, prefix: str = PREFIX) -> str:
    """Name of the shard's set of accounts verified against the ledger since Redis started. The
    scripts append ':' + the server's run_id (lua/_wallet.lua live_set), so a copy restored from
    an RDB file, a rewritten AOF or a replica's sync is never read by another server process."""
    return f"{shard_tag(shard, prefix)}:live"


def promo_failures_key(account_id: str, *, shards: int = DEFAULT_SHARDS, prefix: str = PREFIX) -> str:
    """Counter of an account's failed promo-code attempts in the current window."""
    return f"{shard_tag(shard_of(account_id, shards), prefix)}:promofail:{account_id}"


def registration_address_key(address: str, prefix: str = PREFIX) -> str:
    """Counter of registrations from one client address in the current window."""
    return f"{prefix}:reg:addr:{address}"


def registration_global_key(prefix: str = PREFIX) -> str:
    """Counter of all registrations in the current window."""
    return f"{prefix}:reg:all"


class LoginKeys(NamedTuple):
    """Failed-login bookkeeping of one subject (an account's email digest, or a client address);
    one hash tag, so a transaction may touch all three."""

    failures: str  # counter of failed logins in the window
    lockout: str  # present while logins are refused; its TTL is the Retry-After
    strikes: str  # how many lockouts lately: each doubles the next


def login_keys(subject: str, prefix: str = PREFIX) -> LoginKeys:
    tag = f"{prefix}:{{login:{subject}}}"
    return LoginKeys(failures=f"{tag}:fails", lockout=f"{tag}:lock", strikes=f"{tag}:strikes")


def stream_slots_key(account_id: str, *, shards: int = DEFAULT_SHARDS, prefix: str = PREFIX) -> str:
    """Zset of an account's open balance streams, scored by when each one's lease ends."""
    return f"{shard_tag(shard_of(account_id, shards), prefix)}:sse:{account_id}"


def idempotency_key(account_id: str, request_id: str, *, shards: int = DEFAULT_SHARDS, prefix: str = PREFIX) -> str:
    """The key of one request's idempotency record: `<tag>:idem2:<len(account)>:<account>:<request id>`.

    Both ids may contain ':', so the account id is length-prefixed: with plain
    `idem:<account>:<request>` the account `col` with request `y28:req-1` and the account
    `col:y28` with request `req-1` shared one record (a debit of one was replayed as the other's).
    With an empty request id the result is the prefix every request id of the account extends
    (the meter caches it and appends the request id on the hot path).

    Upgrade: the old `idem:` records are not read; they expire by themselves within 24 h. A retry
    that crosses the upgrade of a request first made before it is charged again (looking the old key
    up too would cost a seventh script key and bring the ambiguity back for a day). The new word is
    `idem2`, not `idem`, so no new key can ever equal an old one (old `idem:3:col:req` of account `3`).
    """
    return f"{shard_tag(shard_of(account_id, shards), prefix)}:idem2:{len(account_id)}:{account_id}:{request_id}"


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
        idempotency=idempotency_key(account_id, request_id, shards=shards, prefix=prefix),
    )


def account_key_pattern(shard: int, prefix: str = PREFIX) -> str:
    """SCAN pattern of every account hash of one shard (see account_of_key)."""
    return f"{shard_tag(shard, prefix)}:a:*"


def account_of_key(account_key: str) -> str:
    """The account id of an account hash key (`<tag>:a:<account>`; the id may contain ':')."""
    return account_key.split(":a:", 1)[1]


def revoked_api_key_key(key_id: str, prefix: str = PREFIX) -> str:
    """String set when a service key is revoked: every process checks it before serving a
    cached verdict while the database is down."""
    return f"{prefix}:revoked-api-key:{key_id}"
