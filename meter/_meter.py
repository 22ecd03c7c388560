"""`Meter`: the public, async face of the wallet. Validates input, builds script arguments,
runs one script per call on a store (Redis/Lua, or the reference model) and turns replies
into values. A denial is a `Decision`; faults raise from `MeterError`. How a call reaches the
store and how replies decode is in `meter._calls`.
"""

from __future__ import annotations

from typing import Any

from meter import _wire as wire
from meter._calls import Loader, RedisBacked, ScriptCalls, Store
from meter._calls import fingerprint as _fingerprint
from meter._clock import month_end_ms
from meter._errors import InvalidInput
from meter._types import Balance, Decision, Receipt
from meter._validate import (
    MAX_HOLD_TTL_MS,
    check_account_id,
    check_hold_id,
    check_int,
    check_request_id,
    check_text,
)

__all__ = ["CREDIT_KINDS", "Loader", "Meter", "Store"]

CREDIT_BUCKETS = {"bonus": "b", "premium": "p"}
CREDIT_KINDS = ("adjustment", "bonus", "grant", "purchase", "refund")


class Meter(ScriptCalls):
    """Token wallet operations for one deployment (one key prefix, one shard count)."""

    @classmethod
    async def connect(
        cls,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        timeout_ms: int = 100,
        connect_timeout_ms: int = 100,
        idempotency_ttl_s: int = wire.IDEMPOTENCY_TTL_S,
        **options: Any,
    ) -> Meter:
        """A Meter on Redis at `url` (redis://, rediss:// or unix://); `fakeredis://` runs an
        in-process Redis with Lua (the embedded default).

        Connecting gives up after `connect_timeout_ms` (100) and a call waits at most `timeout_ms` (100) for Redis:
        when Redis is down every call raises StoreUnavailable instead of waiting (fail closed); OutcomeUnknown when
        the command was sent and its reply lost (it may have run: retry with the same request id).
        A call's answer is kept `idempotency_ttl_s` (86,400; 60 s to 7 days) for a retry.
        """
        from meter._scripts import ScriptRegistry

        registry = ScriptRegistry(idempotency_ttl_s=idempotency_ttl_s)
        store: Store
        if url.startswith("fakeredis://"):
            import fakeredis

            from meter._redis_store import RedisStore

            store = RedisStore(fakeredis.FakeAsyncRedis(decode_responses=True), registry)
        else:
            from meter._pipelined_store import PipelinedRedisStore

            store = PipelinedRedisStore(url, registry, timeout_ms=timeout_ms, connect_timeout_ms=connect_timeout_ms)
        return cls(store, idempotency_ttl_s=idempotency_ttl_s, **options)

    async def close(self) -> None:
        await self.store.close()

    @property
    def redis(self) -> Any:
        """The redis-py client of a Redis-backed store, for everything off the hot path (the
        flusher, tools, health checks); TypeError for a store without one (the reference model)."""
        if not isinstance(self.store, RedisBacked):
            raise TypeError(f"{type(self.store).__name__} has no Redis client")
        return self.store.redis

    async def rehydrate(self, account_id: str) -> bool:
        """Load the account from the loader's snapshot if Redis lacks it or is behind it (Redis
        lost its last writes); True if loaded. Either way the account is then verified."""
        check_account_id(account_id)
        if self.loader is None:
            return False
        return await self._load(account_id) in ("ok", "replaced")

    # -- operations ------------------------------------------------------------------------------

    async def open_account(self, account_id: str, plan: str = "free") -> bool:
        """Open an account and grant this month's allowance; False if it already existed."""
        check_account_id(account_id)
        p = self.catalog.plan(plan)
        args = (p.id, p.monthly_tokens, p.daily_requests, p.requests_per_minute, p.max_tokens_per_request,
                p.rollover_pct)
        if self.loader is not None:
            # Missing from Redis is not new: it may have been lost with Redis data. The database
            # decides (rehydrate); only an account it does not know either is created.
            now, month, day = self._now()
            argv = (account_id, now, month, day, "", "", *args)
            reply = await self.store.call("open", self._keys(account_id, ""), (*argv, "probe"))
            if reply[wire.CODE] != "no_account":
                return bool(reply[wire.CODE] == "ok")
            if await self._load(account_id) != "no_account":
                return False
        reply = await self._run("open", account_id, "", "", args)
        return bool(reply[wire.CODE] == "ok")

    def _labels(self, agent: str | None, model: str | None, input_tokens: int | None,
                output_tokens: int | None, project_id: str | None) -> tuple[str, str, str | int, str | int, str]:
        """A charge's journaled labels, checked: agent, model, input and output tokens, project."""
        self.catalog.check_agent(agent)
        self.catalog.check_model(model)
        inp = "" if input_tokens is None else check_int("input_tokens", input_tokens, low=0)
        out = "" if output_tokens is None else check_int("output_tokens", output_tokens, low=0)
        return agent or "", model or "", inp, out, check_text("project_id", project_id)

    async def debit(
        self,
        account_id: str,
        tokens: int,
        *,
        agent: str | None = None,
        model: str | None = None,
        request_id: str | None = None,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        project_id: str | None = None,
    ) -> Decision:
        """Check-and-deduct `tokens` now. Retrying with the same request_id charges once."""
        check_account_id(account_id)
        check_int("tokens", tokens)
        rid = check_request_id(request_id)
        args = (tokens, *self._labels(agent, model, input_tokens, output_tokens, project_id))
        fp = _fingerprint("debit", *args) if rid else ""
        return self._decision(account_id, await self._run("debit", account_id, rid, fp, args))

    async def record_usage(
        self,
        account_id: str,
        tokens: int,
        *,
        agent: str | None = None,
        model: str | None = None,
        request_id: str | None = None,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        project_id: str | None = None,
    ) -> Receipt:
        """Record `tokens` already used (a streamed call, a log shipper's event). Never refused
        by the per-request maximum or the daily and per-minute limits, which bound what may be
        asked, not what was used: charges what the balance covers (`Receipt.charged`) and
        reports the rest as `uncollected`; the request is counted. Charged once per request_id
        (which shares debit's and reserve's namespace: the same id there is a conflict)."""
        check_account_id(account_id)
        check_int("tokens", tokens, low=0)
        rid = check_request_id(request_id)
        args = (tokens, *self._labels(agent, model, input_tokens, output_tokens, project_id))
        fp = _fingerprint("usage", *args) if rid else ""
        r = wire.decode_reply(await self._run("usage", account_id, rid, fp, args))
        return Receipt(f"{account_id}:{r.id}", r.available, r.held, r.replayed, tokens=tokens,
                       charged=r.x1, uncollected=r.x2)

    async def reserve(
        self,
        account_id: str,
        tokens: int,
        *,
        ttl_ms: int | None = None,
        agent: str | None = None,
        model: str | None = None,
        request_id: str | None = None,
        project_id: str | None = None,
    ) -> Decision:
        """Hold `tokens` until settle/release (or expiry after ttl_ms); the Decision has hold_id."""
        check_account_id(account_id)
        check_int("tokens", tokens)
        ttl = check_int("ttl_ms", self.hold_ttl_ms if ttl_ms is None else ttl_ms, high=MAX_HOLD_TTL_MS)
        rid = check_request_id(request_id)
        self.catalog.check_agent(agent)
        self.catalog.check_model(model)
        pj = check_text("project_id", project_id)
        args = (tokens, ttl, agent or "", model or "", pj)
        fp = _fingerprint("reserve", *args) if rid else ""
        reply = await self._run("reserve", account_id, rid, fp, args)
        decision = self._decision(account_id, reply)
        if not decision.allowed:
            return decision
        r = wire.decode_reply(reply)  # reserve: id is the hold id, x2 its expiry
        return Decision(**{**_fields(decision), "hold_id": r.id, "expires_at_ms": r.x2})

    async def settle(
        self,
        account_id: str,
        hold_id: str,
        actual_tokens: int,
        *,
        agent: str | None = None,
        model: str | None = None,
        request_id: str | None = None,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        project_id: str | None = None,
    ) -> Receipt:
        """Charge the actual usage of a hold and return the rest; shortfall → `uncollected`.
        request_id has its own namespace (see `meter._calls.scoped_request_id`): a call's reserve and its
        settle may carry the same one."""
        check_account_id(account_id)
        check_hold_id(hold_id)
        check_int("actual_tokens", actual_tokens, low=0)
        rid = check_request_id(request_id)
        args = (hold_id, actual_tokens, *self._labels(agent, model, input_tokens, output_tokens, project_id))
        fp = _fingerprint("settle", *args) if rid else ""
        return self._receipt(account_id, await self._run("settle", account_id, rid, fp, args), hold_id)

    async def release(self, account_id: str, hold_id: str, *, request_id: str | None = None) -> Receipt:
        """Cancel a hold: every held token goes back where it came from."""
        check_account_id(account_id)
        check_hold_id(hold_id)
        rid = check_request_id(request_id)
        fp = _fingerprint("release", hold_id) if rid else ""
        reply = await self._run("release", account_id, rid, fp, (hold_id,))
        receipt = self._receipt(account_id, reply, hold_id)
        return Receipt(receipt.transaction_id, receipt.remaining, receipt.reserved, receipt.replayed,
                       tokens=receipt.tokens)

    async def credit(
        self,
        account_id: str,
        tokens: int,
        *,
        bucket: str = "bonus",
        kind: str = "grant",
        note: str | None = None,
        reference: str | None = None,
        request_id: str | None = None,
    ) -> Receipt:
        """Add tokens to the bonus or premium bucket, journaled as `kind`."""
        check_account_id(account_id)
        check_int("tokens", tokens)
        if bucket not in CREDIT_BUCKETS:
            raise InvalidInput("bucket", f"must be one of {sorted(CREDIT_BUCKETS)}")
        if kind not in CREDIT_KINDS:
            raise InvalidInput("kind", f"must be one of {list(CREDIT_KINDS)}")
        rid = check_request_id(request_id)
        args = (CREDIT_BUCKETS[bucket], tokens, kind, check_text("note", note, 500),
                check_text("reference", reference, 255))
        fp = _fingerprint("credit", *args) if rid else ""
        receipt = self._receipt(account_id, await self._run("credit", account_id, rid, fp, args))
        return Receipt(receipt.transaction_id, receipt.remaining, receipt.reserved, receipt.replayed,
                       tokens=receipt.tokens)

    async def set_plan(self, account_id: str, plan: str, *, when: str = "now", note: str | None = None,
                       request_id: str | None = None) -> Receipt:
        """Move to `plan`: "now" (an upgrade: limits change and the monthly bucket becomes the new
        allowance minus this month's use) or "next" (a downgrade or cancel, at the next period).
        `Receipt.tokens` is the change of the monthly bucket."""
        check_account_id(account_id)
        p = self.catalog.plan(plan)
        if when not in ("now", "next"):
            raise InvalidInput("when", "must be 'now' or 'next'")
        rid = check_request_id(request_id)
        args = (p.id, p.monthly_tokens, p.daily_requests, p.requests_per_minute, p.max_tokens_per_request,
                p.rollover_pct, when, check_text("note", note, 300))
        fp = _fingerprint("plan", *args) if rid else ""
        r = wire.decode_reply(await self._run("plan", account_id, rid, fp, args))
        return Receipt(f"{account_id}:{r.id}", r.available, r.held, r.replayed, tokens=r.x1)

    async def adjust(self, account_id: str, tokens: int, *, bucket: str = "premium", kind: str = "adjustment",
                     note: str | None = None, reference: str | None = None,
                     request_id: str | None = None) -> Receipt:
        """Take up to `tokens` back from a bucket ("bonus", "premium", or "any" in burn order).
        Never below zero: `Receipt.tokens` is what was taken, `uncollected` what is still owed."""
        check_account_id(account_id)
        check_int("tokens", tokens)
        buckets = {**CREDIT_BUCKETS, "any": "*"}
        if bucket not in buckets:
            raise InvalidInput("bucket", f"must be one of {sorted(buckets)}")
        if kind not in CREDIT_KINDS:
            raise InvalidInput("kind", f"must be one of {list(CREDIT_KINDS)}")
        rid = check_request_id(request_id)
        args = (buckets[bucket], tokens, kind, check_text("note", note, 500), check_text("reference", reference, 255))
        fp = _fingerprint("adjust", *args) if rid else ""
        r = wire.decode_reply(await self._run("adjust", account_id, rid, fp, args))
        return Receipt(f"{account_id}:{r.id}" if int(r.id) else "", r.available, r.held, r.replayed,
                       tokens=r.x1, uncollected=r.x2)

    async def balance(self, account_id: str) -> Balance:
        """The live balance (performs a due month/day reset and hold expiry first)."""
        check_account_id(account_id)
        reply = await self._run("balance", account_id, "", "", ())
        f = dict(zip(reply[1::2], reply[2::2], strict=True))
        n = {k: int(v) for k, v in f.items() if k not in wire.TEXT_FIELDS}
        return Balance(
            account_id=account_id, plan=str(f["plan"]), rollover_tokens=n["r"],
            monthly_remaining=n["m"], bonus_tokens=n["b"], premium_tokens=n["p"],
            reserved_tokens=n["h"], monthly_allowance=n["allow"], used_tokens=n["used"],
            requests_today=n["rq"], tokens_used_today=n["ut"], total_requests=n["treq"],
            daily_request_limit=n["dcap"], requests_per_minute=n["rpm"],
            max_tokens_per_request=n["maxreq"], month_reset_ms=month_end_ms(n["per"]),
            pending_plan=wire.pending_plan_id(str(f.get("np") or "")),
        )

    async def snapshot(self, account_id: str) -> dict[str, str]:
        """The account's raw fields (for persistence snapshots and rehydration)."""
        check_account_id(account_id)
        reply = await self._run("balance", account_id, "", "", ())
        return {str(k): str(v) for k, v in zip(reply[1::2], reply[2::2], strict=True)}

    async def sweep_account(self, account_id: str, limit: int = 100) -> int:
        """Release up to `limit` expired holds of one account; returns how many."""
        check_account_id(account_id)
        reply = await self._run("sweep", account_id, "", "", (check_int("limit", limit),))
        return int(reply[1])  # {'ok', holds released}


def _fields(d: Decision) -> dict[str, Any]:
    return {name: getattr(d, name) for name in Decision.__slots__}
