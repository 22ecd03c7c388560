"""The Meter's script calls: validated arguments in, one script on a store, replies out as values.

`ScriptCalls` holds what a call needs (store, catalog, clock, key layout, loader), builds KEYS and the
common ARGV, runs the script (rehydrating from the loader when Redis lacks or has not verified the
account), maps fault replies to `MeterError`s and decodes the rest. The public operations are on
`Meter` (meter/_meter.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import lru_cache
from typing import Any, Protocol, runtime_checkable

from meter import _wire as wire
from meter import keys as keyspace
from meter._catalog import Catalog, default_catalog
from meter._clock import Clock, SystemClock, month_end_ms, month_index
from meter._errors import (
    IdempotencyConflict,
    InvalidInput,
    LedgerUnavailable,
    MeterError,
    UnknownAccount,
    UnknownHold,
)
from meter._types import Decision, Receipt
from meter._validate import MAX_HOLD_TTL_MS, check_int

__all__ = ["Loader", "RedisBacked", "ScriptCalls", "Store", "fingerprint", "scoped_request_id"]

_DECISIONS = {"ok", "insufficient", "daily_cap", "rate_limited"}
SCOPED_OPERATIONS = frozenset({"settle", "release"})  # their request ids have their own namespace

Loader = Callable[[str], Awaitable[Mapping[str, str | int] | None]]
"""Rehydration: returns an account's snapshot fields (those of the balance script, plus
'hold:<id>' open holds and 'idem:<request id>' → '<ttl_s>:<record>' idempotency records) or None.
With a loader, every account is verified against it at its first touch since Redis started
(see lua/_wallet.lua: the 'live' set), so Redis behind the ledger is caught before a write."""


@runtime_checkable
class RedisBacked(Protocol):
    """A store on Redis: `redis` is its ordinary redis-py client (off the hot path)."""

    redis: Any


class Store(Protocol):
    """Runs one wallet operation atomically: `call(op, KEYS, ARGV)` → the script's reply."""

    def call(self, op: str, keys: Sequence[str], argv: Sequence[str | int]) -> Awaitable[list[Any]]: ...

    async def close(self) -> None: ...


def fingerprint(*parts: object) -> str:
    """A short digest of a call's arguments: a replay with other arguments is a conflict.
    64 bits (16 hex characters): the first 16 of the 24 that records written before it carry,
    which the scripts accept too (lua/_wallet.lua: replay), so no retry across an upgrade is refused."""
    return hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=12).hexdigest()[:FINGERPRINT_CHARS]


FINGERPRINT_CHARS = 16


def scoped_request_id(op: str, request_id: str) -> str:
    """The request id settle and release store under: '<op>:<id>', so one call's reserve and
    its settle (or release) may use the same Idempotency-Key, while a retry of either is still
    answered once. Within the ledger's 255 characters: a longer id is kept as its digest."""
    if not request_id:
        return ""
    scoped = f"{op}:{request_id}"
    if len(scoped) <= 255:
        return scoped
    return f"{op}:#{hashlib.blake2b(request_id.encode(), digest_size=20).hexdigest()}"


class ScriptCalls:
    """One deployment's script calls (one key prefix, one shard count); `Meter` adds the operations."""

    def __init__(
        self,
        store: Store,
        *,
        catalog: Catalog | None = None,
        clock: Clock | None = None,
        shards: int = keyspace.DEFAULT_SHARDS,
        prefix: str = keyspace.PREFIX,
        hold_ttl_ms: int = 300_000,
        loader: Loader | None = None,
        idempotency_ttl_s: int = wire.IDEMPOTENCY_TTL_S,
    ) -> None:
        self.store = store
        self.catalog = catalog or default_catalog()
        self.clock = clock or SystemClock()
        self.shards = shards
        self.prefix = prefix
        self.hold_ttl_ms = check_int("hold_ttl_ms", hold_ttl_ms, high=MAX_HOLD_TTL_MS)
        self.loader = loader
        # how long the store keeps a call's answer (the scripts carry it: see ScriptRegistry);
        # a loader restores the answers of that window
        self.idempotency_ttl_s = idempotency_ttl_s
        self._month = (0, -1, 0)  # (month start ms, month end ms, month index) of the last call

        @lru_cache(maxsize=65_536)
        def _account_keys(account_id: str) -> keyspace.AccountKeys:
            return keyspace.account_keys(account_id, shards=shards, prefix=prefix)

        self._account_keys = _account_keys

        @lru_cache(maxsize=65_536)
        def _live_key(account_id: str) -> str:
            return keyspace.live_key(keyspace.shard_of(account_id, shards), prefix)

        self._live_key = _live_key

    # -- arguments -------------------------------------------------------------------------------

    def _keys(self, account_id: str, request_id: str) -> Sequence[str]:
        k = self._account_keys(account_id)
        if self.loader is not None:  # KEYS[7]: the verified set (the scripts gate on it)
            idem = f"{k.idempotency}{request_id}" if request_id else k.idempotency
            return (*k[:5], idem, self._live_key(account_id))
        if not request_id:
            return k
        # k.idempotency is keyspace.idempotency_key(account_id, ""), the prefix of every request id's key
        return (*k[:5], f"{k.idempotency}{request_id}")

    def _now(self) -> tuple[int, int, int]:
        now = self.clock.now_ms()
        start, end, month = self._month
        if not start <= now < end:
            month = month_index(now)
            start, end = month_end_ms(month - 1), month_end_ms(month)
            self._month = (start, end, month)
        return now, month, now // 86_400_000

    async def _run(self, op: str, account_id: str, request_id: str, fingerprint: str,
                   args: Sequence[str | int]) -> list[Any]:
        now, month, day = self._now()
        stored_id = scoped_request_id(op, request_id) if op in SCOPED_OPERATIONS else request_id
        argv = (account_id, now, month, day, stored_id, fingerprint, *args)
        reply = await self.store.call(op, self._keys(account_id, stored_id), argv)
        # missing (lost with Redis data) or not yet verified since Redis started: load or
        # check against the ledger, then run the call again
        if (reply[wire.CODE] in ("no_account", "verify") and self.loader is not None
                and await self._load(account_id) != "no_account"):
            reply = await self.store.call(op, self._keys(account_id, stored_id), argv)
        code = reply[wire.CODE]
        if code == "verify":
            raise MeterError(f"account {account_id} could not be verified against the ledger")
        if code == "no_account":
            raise UnknownAccount(account_id)
        if code == "conflict":
            raise IdempotencyConflict(request_id)
        if code == "over_max":
            raise InvalidInput("tokens", f"exceeds the plan's per-request maximum of {reply[wire.X1]}",
                               maximum=int(reply[wire.X1]))
        if code == "overflow":
            raise InvalidInput("tokens", "would take the bucket past 2^53")
        return reply

    async def _load(self, account_id: str) -> str:
        """The load script's answer: ok (loaded), replaced (Redis was behind), exists (kept), no_account."""
        assert self.loader is not None
        try:
            snapshot = await self.loader(account_id) or {}
        except MeterError:
            raise
        except Exception as exc:  # the loader reads the database: a fault there leaves Redis untouched
            raise LedgerUnavailable(f"account {account_id!r} must be read from the ledger, which could not be "
                                    f"read ({type(exc).__name__}); nothing was changed") from exc
        keys = list(self._keys(account_id, ""))
        fields: list[str | int] = []
        for name, value in snapshot.items():
            if name.startswith("idem:"):  # the record's key goes in KEYS; the field names its index
                keys.append(keyspace.idempotency_key(account_id, name[5:], shards=self.shards, prefix=self.prefix))
                name = f"idem:{len(keys)}"
            fields += [name, value]
        now, month, day = self._now()
        reply = await self.store.call("load", keys, (account_id, now, month, day, "", "", *fields))
        return str(reply[wire.CODE])

    def _decision(self, account_id: str, raw: list[Any]) -> Decision:
        if raw[wire.CODE] not in _DECISIONS:
            raise MeterError(f"unexpected reply {raw!r}")
        r = wire.decode_reply(raw)
        allowed = r.code == "ok"
        return Decision(
            allowed=allowed, reason=r.code, tokens=r.x1, remaining=r.available, reserved=r.held,
            requests_today=r.requests_today, tokens_used_today=r.tokens_used_today,
            daily_request_limit=r.daily_limit, retry_after_ms=r.retry_after_ms, replayed=r.replayed,
            transaction_id=f"{account_id}:{r.id}" if allowed else None,
        )

    def _receipt(self, account_id: str, raw: list[Any], hold_id: str = "") -> Receipt:
        if raw[wire.CODE] == "no_hold":
            raise UnknownHold(account_id, hold_id)
        r = wire.decode_reply(raw)
        return Receipt(
            transaction_id=f"{account_id}:{r.id}", remaining=r.available, reserved=r.held,
            replayed=r.replayed, tokens=r.x1, charged=r.x1, uncollected=r.x2,
        )
