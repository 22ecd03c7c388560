"""Parity: the Lua wallet against the reference model, driven side by side by Hypothesis.

One state machine owns two `Meter`s with the same catalog, shard count, key prefix and clock
times: one over `ReferenceStore` (the pure-Python statement of the semantics), one over the Lua
scripts (fakeredis; also the real Redis when the conftest lists it). Every rule runs the same
call on both and requires the same outcome (the same Decision/Receipt/Balance, or the same
exception). After every step the machine compares, without touching the accounts, every key the
scripts own (account hashes, holds, hold-expiry and sweep zsets, idempotency records, the
shard journal streams) and each account's journal entries, and checks the wallet invariants on
the Lua side (no bucket negative, conservation, seq order). Then it calls `balance()` on both
sides for every opened account and compares those.

`balance()` performs the lazy month/day reset and hold expiry itself, so it is skipped right
after a clock move: the first call after a move is then a rule's own call (debit, settle,
sweep, ...), and the resets and expiries run inside that script too, not only in balance.

Runtime: TOKENMETER_PARITY_EXAMPLES (default 60) and TOKENMETER_PARITY_STEPS (default 40).
"""

from __future__ import annotations

import asyncio
import os
import tomllib
import uuid
from collections import Counter
from collections.abc import Sequence
from importlib import resources
from typing import Any

import fakeredis
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from meter import (
    CREDIT_KINDS,
    Decision,
    FakeClock,
    JournalEntry,
    Meter,
    Receipt,
    ReferenceStore,
    StoreUnavailable,
    UnknownAccount,
)
from meter import keys as keyspace
from meter._catalog import Catalog, parse_catalog
from meter._clock import DAY_MS, month_end_ms, month_index
from meter._redis_store import RedisStore
from tests.conftest import REDIS_URL, journal_of

pytestmark = [pytest.mark.redis, pytest.mark.slow]

EXAMPLES = int(os.environ.get("TOKENMETER_PARITY_EXAMPLES", "60"))
STEPS = int(os.environ.get("TOKENMETER_PARITY_STEPS", "40"))

SHARDS = 2  # alice and carol share shard 1 (one journal stream, one sweep zset); bob is on shard 0
ACCOUNTS = ("alice", "bob", "carol")
REQUEST_IDS = ("r1", "r2", "r3")  # a small pool, so replays and conflicts both happen
# what they are stored under: settle and release have their own namespaces (scoped_request_id)
STORED_IDS = tuple(x for rid in REQUEST_IDS for x in (rid, f"settle:{rid}", f"release:{rid}"))
UNKNOWN_HOLDS = ("0", "1", "2", "999999")  # never a hold: "1"/"2" are usually other entries' seqs
BASE_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
MINUTE_MS = 60_000


def _catalog() -> Catalog:
    """The built-in catalog plus small plans whose limits a 40-step run actually reaches."""
    data = tomllib.loads(resources.files("meter").joinpath("catalog.toml").read_text("utf-8"))
    data["plans"]["tiny"] = {  # per-minute limit (burst 2) and a daily cap of 5
        "name": "Tiny", "monthly_tokens": 12_000, "price_inr_paise": 0, "daily_requests": 5,
        "requests_per_minute": 2, "max_tokens_per_request": 5_000, "rollover_pct": 30,
    }
    data["plans"]["odd"] = {  # 60 s / 7 is not a whole number of microseconds; 33 % rollover
        "name": "Odd", "monthly_tokens": 9_999, "price_inr_paise": 0, "daily_requests": 0,
        "requests_per_minute": 7, "rollover_pct": 33,
    }
    data["plans"]["capped"] = {  # a daily cap of 3 and no per-minute limit; nothing rolls over
        "name": "Capped", "monthly_tokens": 30_000, "price_inr_paise": 0, "daily_requests": 3,
        "rollover_pct": 0,
    }
    data["plans"]["payg"] = {  # no allowance at all (open journals nothing), full rollover
        "name": "PAYG", "monthly_tokens": 0, "price_inr_paise": 0, "rollover_pct": 100,
    }
    return parse_catalog(data)


CATALOG = _catalog()
PLANS = st.sampled_from(["free", "basic", "pro", "tiny", "odd", "capped", "payg"])
ACCOUNT_IDS = st.sampled_from(ACCOUNTS)
RIDS = st.one_of(st.none(), st.none(), st.sampled_from(REQUEST_IDS))  # a third carry one
AGENTS = st.sampled_from([None, "idea", "code"])
MODELS = st.sampled_from([None, "haiku", "sonnet"])
PROJECTS = st.sampled_from([None, "p1"])
OPT_COUNT = st.none() | st.integers(0, 5_000)
SMALL = st.integers(1, 1_500)
# 1..9000 (over the 8,192 and 5,000 per-request maxima), small amounts, and the exact edges
TOKENS = st.one_of(st.integers(1, 9_000), SMALL, SMALL, st.sampled_from([5_000, 5_001, 8_192, 8_193]))
TTLS = st.none() | st.integers(1, 200_000)


def _outcome_error(exc: Exception) -> tuple[Any, ...]:
    return ("raised", type(exc).__name__, getattr(exc, "field", None), str(exc))


def _label(name: str, outcome: tuple[Any, ...]) -> str:
    """A coarse label of an outcome, for the coverage summary the test prints."""
    if outcome[0] == "raised":
        return f"{name}: {outcome[1]}" + (f"({outcome[2]})" if outcome[2] else "")
    value = outcome[1]
    if isinstance(value, Decision):
        return f"{name}: {value.reason}" + (" replayed" if value.replayed else "")
    if isinstance(value, Receipt):
        extra = " uncollected" if value.uncollected else ""
        return f"{name}: ok{extra}" + (" replayed" if value.replayed else "")
    if name == "sweep_account":
        return f"{name}: {'some' if value else 'none'} released"
    return f"{name}: ok"


class ParityMachine(RuleBasedStateMachine):
    """Reference model vs Lua, one call at a time, compared after every step."""

    def __init__(self, backend: str, stats: Counter[str]) -> None:
        super().__init__()
        self.backend = backend
        self.stats = stats  # outcome labels over the whole run (printed by the test)
        self.prefix = f"tmparity{uuid.uuid4().hex[:10]}"
        self.now = BASE_MS
        self.ref_clock = FakeClock(self.now)
        self.lua_clock = FakeClock(self.now)
        self.opened: set[str] = set()
        self.holds: list[tuple[str, str, int]] = []  # (account, hold id, tokens) of every hold made
        self.recorded: list[tuple[str, tuple[Any, ...], tuple[tuple[str, Any], ...]]] = []
        self.just_moved = False
        self.journaled: dict[str, int] = {}  # entries already seen per account (for statistics)
        self.keysets = {a: keyspace.account_keys(a, shards=SHARDS, prefix=self.prefix) for a in ACCOUNTS}
        self.shard_keys = sorted({(k.sweep, k.journal) for k in self.keysets.values()})
        self.loop = asyncio.new_event_loop()
        self.ref = Meter(ReferenceStore(), catalog=CATALOG, clock=self.ref_clock, shards=SHARDS,
                         prefix=self.prefix)
        # the Redis client and RedisStore make futures on the running loop: build them inside it
        self.lua: Meter = self.loop.run_until_complete(self._build_lua())

    async def _build_lua(self) -> Meter:
        options: dict[str, Any] = {"catalog": CATALOG, "clock": self.lua_clock, "shards": SHARDS,
                                   "prefix": self.prefix}
        if self.backend == "fakeredis":
            return Meter(RedisStore(fakeredis.FakeAsyncRedis(decode_responses=True)), **options)
        assert self.backend == "redis", self.backend
        meter = await Meter.connect(REDIS_URL, timeout_ms=2000, **options)
        # Open the hot-path connection now (it gives up after 100 ms, which a busy CI box can
        # miss): a balance of a missing account writes nothing. A failed connect sent nothing.
        for attempt in range(5):
            try:
                await meter.balance("parity-warmup")
            except UnknownAccount:
                break
            except StoreUnavailable:
                await asyncio.sleep(0.1 * (attempt + 1))
        return meter

    def teardown(self) -> None:
        try:
            self.loop.run_until_complete(self._close())
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    async def _close(self) -> None:
        client = self.lua.store.redis  # type: ignore[attr-defined]
        try:
            found = [k async for k in client.scan_iter(match=f"{self.prefix}:*", count=1000)]
            if found:
                await client.delete(*found)
        finally:
            await self.lua.close()
            await self.ref.close()

    # -- running one call on both sides ------------------------------------------------------

    def _run(self, meter: Meter, name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        async def go() -> tuple[Any, ...]:
            try:
                return ("ok", await getattr(meter, name)(*args, **kwargs))
            except Exception as exc:  # any exception is an outcome to compare
                return _outcome_error(exc)

        return self.loop.run_until_complete(go())

    def _both(self, name: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        """Run one Meter call on the reference, then on Lua; the outcomes must be equal."""
        self.just_moved = False
        ref = self._run(self.ref, name, args, kwargs)
        lua = self._run(self.lua, name, args, kwargs)
        assert ref == lua, f"{name}{args} {kwargs}:\n  reference: {ref!r}\n  lua:       {lua!r}"
        self.stats[_label(name, ref)] += 1
        if kwargs.get("request_id") is not None:
            call = (name, args, tuple(sorted(kwargs.items())))
            if call not in self.recorded:
                self.recorded.append(call)
        return ref

    def _set_time(self, now: int) -> None:
        self.now = now
        self.ref_clock.set(now)
        self.lua_clock.set(now)
        self.just_moved = True

    def _open_holds(self) -> list[tuple[str, str, int]]:
        """(account, hold id, tokens) of the holds open now, read from the reference model."""
        store = self.ref.store
        assert isinstance(store, ReferenceStore)
        return [(account, hid, hold.tokens) for account, ks in self.keysets.items()
                for hid, hold in sorted(store.holds.get(ks.holds, {}).items())]

    def _hold_expiries(self) -> list[int]:
        store = self.ref.store
        assert isinstance(store, ReferenceStore)
        return sorted(h.exp for ks in self.keysets.values() for h in store.holds.get(ks.holds, {}).values())

    # -- rules: accounts and money -----------------------------------------------------------

    @initialize(start=st.integers(0, 400 * DAY_MS),
                plans=st.tuples(PLANS, st.none() | PLANS, st.none() | PLANS))
    def open_accounts(self, start: int, plans: tuple[str | None, ...]) -> None:
        """Start somewhere in 2026-27; open the first account, and the others unless None."""
        self._set_time(BASE_MS + start)
        for account, plan in zip(ACCOUNTS, plans, strict=True):
            if plan is not None and self._both("open_account", account, plan)[0] == "ok":
                self.opened.add(account)

    @rule(account=ACCOUNT_IDS, plan=PLANS)
    def open_account(self, account: str, plan: str) -> None:
        if self._both("open_account", account, plan)[0] == "ok":
            self.opened.add(account)

    @rule(account=ACCOUNT_IDS, tokens=TOKENS, agent=AGENTS, model=MODELS, request_id=RIDS,
          input_tokens=OPT_COUNT, output_tokens=OPT_COUNT, project_id=PROJECTS)
    def debit(self, account: str, tokens: int, agent: str | None, model: str | None,
              request_id: str | None, input_tokens: int | None, output_tokens: int | None,
              project_id: str | None) -> None:
        self._both("debit", account, tokens, agent=agent, model=model, request_id=request_id,
                   input_tokens=input_tokens, output_tokens=output_tokens, project_id=project_id)

    @rule(account=ACCOUNT_IDS, tokens=st.integers(0, 30_000) | TOKENS, agent=AGENTS, model=MODELS,
          request_id=RIDS, input_tokens=OPT_COUNT, output_tokens=OPT_COUNT, project_id=PROJECTS)
    def record_usage(self, account: str, tokens: int, agent: str | None, model: str | None,
                     request_id: str | None, input_tokens: int | None, output_tokens: int | None,
                     project_id: str | None) -> None:
        """Usage after the fact: past the maximum and the caps, the shortfall uncollected."""
        self._both("record_usage", account, tokens, agent=agent, model=model, request_id=request_id,
                   input_tokens=input_tokens, output_tokens=output_tokens, project_id=project_id)

    @rule(account=ACCOUNT_IDS, op=st.sampled_from(["debit", "reserve"]), n=st.integers(2, 12),
          tokens=st.integers(1, 300) | SMALL, ttl_ms=TTLS)
    def burst(self, account: str, op: str, n: int, tokens: int, ttl_ms: int | None) -> None:
        """n requests at the same instant: per-minute limits, daily caps, and more holds expiring
        at once than one touch releases (8): hold ids "10", "11" sort before "2" in Redis."""
        for _ in range(n):
            if op == "debit":
                out = self._both("debit", account, tokens)
            else:
                out = self._reserve(account, tokens, ttl_ms=ttl_ms)
            if out[0] == "raised":
                break

    @rule(account=ACCOUNT_IDS, tokens=st.integers(1, 50_000) | SMALL,
          bucket=st.sampled_from(["bonus", "premium"]), kind=st.sampled_from(CREDIT_KINDS),
          note=st.sampled_from([None, "promo WELCOME2024"]), reference=st.sampled_from([None, "pay_1"]),
          request_id=RIDS)
    def credit(self, account: str, tokens: int, bucket: str, kind: str, note: str | None,
               reference: str | None, request_id: str | None) -> None:
        self._both("credit", account, tokens, bucket=bucket, kind=kind, note=note, reference=reference,
                   request_id=request_id)

    @rule(account=ACCOUNT_IDS, plan=PLANS, when=st.sampled_from(["now", "next"]),
          note=st.sampled_from([None, "support"]), request_id=RIDS)
    def set_plan(self, account: str, plan: str, when: str, note: str | None, request_id: str | None) -> None:
        """An upgrade now, or a downgrade/cancel at the next period (applied by the lazy reset)."""
        self._both("set_plan", account, plan, when=when, note=note, request_id=request_id)

    @rule(account=ACCOUNT_IDS, tokens=st.integers(1, 50_000) | SMALL,
          bucket=st.sampled_from(["bonus", "premium", "any"]), kind=st.sampled_from(CREDIT_KINDS),
          reference=st.sampled_from([None, "pay_1"]), request_id=RIDS)
    def adjust(self, account: str, tokens: int, bucket: str, kind: str, reference: str | None,
               request_id: str | None) -> None:
        """Take tokens back (never below zero; the rest is reported as owed)."""
        self._both("adjust", account, tokens, bucket=bucket, kind=kind, reference=reference,
                   request_id=request_id)

    def _reserve(self, account: str, tokens: int, **kwargs: Any) -> tuple[Any, ...]:
        out = self._both("reserve", account, tokens, **kwargs)
        if out[0] == "ok" and out[1].allowed:
            hold = (account, out[1].hold_id, tokens)
            if hold not in self.holds:
                self.holds.append(hold)
        return out

    @rule(account=ACCOUNT_IDS, tokens=TOKENS, ttl_ms=TTLS, agent=AGENTS, model=MODELS, request_id=RIDS,
          project_id=PROJECTS)
    def reserve(self, account: str, tokens: int, ttl_ms: int | None, agent: str | None,
                model: str | None, request_id: str | None, project_id: str | None) -> None:
        self._reserve(account, tokens, ttl_ms=ttl_ms, agent=agent, model=model, request_id=request_id,
                      project_id=project_id)

    def _pick_hold(self, data: st.DataObject) -> tuple[str, str, int]:
        """Mostly an open hold; else one made earlier (maybe closed or expired since), or an id
        that was never a hold; now and then asked of another account than its own."""
        choice = data.draw(st.integers(0, 3), label="hold kind")
        pool = (self._open_holds() if choice >= 2 else []) or (self.holds if choice >= 1 else [])
        if not pool:
            account = data.draw(ACCOUNT_IDS, label="account")
            return account, data.draw(st.sampled_from(UNKNOWN_HOLDS), label="unknown hold"), 2_000
        account, hold_id, tokens = data.draw(st.sampled_from(pool), label="hold")
        if data.draw(st.integers(0, 7), label="other account") == 0:
            account = data.draw(ACCOUNT_IDS, label="account")
        return account, hold_id, tokens

    @precondition(lambda self: bool(self.holds))
    @rule(data=st.data(), agent=AGENTS, model=MODELS, request_id=RIDS, input_tokens=OPT_COUNT,
          output_tokens=OPT_COUNT, project_id=PROJECTS)
    def settle(self, data: st.DataObject, agent: str | None, model: str | None, request_id: str | None,
               input_tokens: int | None, output_tokens: int | None, project_id: str | None) -> None:
        account, hold_id, tokens = self._pick_hold(data)
        actual = data.draw(st.integers(0, 2 * tokens) | st.sampled_from([0, tokens, tokens + 1, 2 * tokens]),
                           label="actual")
        self._both("settle", account, hold_id, actual, agent=agent, model=model, request_id=request_id,
                   input_tokens=input_tokens, output_tokens=output_tokens, project_id=project_id)

    @rule(account=ACCOUNT_IDS, tokens=TOKENS, ttl_ms=TTLS, data=st.data(),
          wait=st.sampled_from(["none", "short", "to_expiry", "past_month_end"]),
          close=st.sampled_from(["settle", "release"]), request_id=RIDS)
    def hold_lifecycle(self, account: str, tokens: int, ttl_ms: int | None, data: st.DataObject,
                       wait: str, close: str, request_id: str | None) -> None:
        """reserve, let some time pass (maybe to the expiry, maybe into the next month), then
        settle (0..2x the hold, or the overdraw the balance just covers, or one more) or release."""
        out = self._reserve(account, tokens, ttl_ms=ttl_ms)
        if out[0] != "ok" or not out[1].allowed:
            return
        hold_id, expires = out[1].hold_id, out[1].expires_at_ms
        if wait == "short":
            self._set_time(self.now + data.draw(st.integers(0, 2 * MINUTE_MS), label="wait ms"))
        elif wait == "to_expiry":
            self._set_time(max(self.now, expires + data.draw(st.integers(-1, 1), label="vs expiry")))
        elif wait == "past_month_end":
            self._set_time(month_end_ms(month_index(self.now)) + data.draw(st.integers(0, 1_000), label="ms"))
        if close == "settle":  # 0..2x, or just what the balance covers (+1: one uncollected)
            edge = tokens + out[1].remaining
            edges = st.sampled_from([tokens, 2 * tokens, edge, edge + 1])
            actual = data.draw(st.integers(0, 2 * tokens) | edges, label="actual")
            self._both("settle", account, hold_id, actual, request_id=request_id)
        else:
            self._both("release", account, hold_id, request_id=request_id)

    @precondition(lambda self: bool(self.holds))
    @rule(data=st.data(), request_id=RIDS)
    def release(self, data: st.DataObject, request_id: str | None) -> None:
        account, hold_id, _ = self._pick_hold(data)
        self._both("release", account, hold_id, request_id=request_id)

    @rule(account=ACCOUNT_IDS, raw=st.booleans())
    def look(self, account: str, raw: bool) -> None:
        """balance() (or snapshot(), the raw fields): both reset lazily, like any other call."""
        self._both("snapshot" if raw else "balance", account)

    @rule(data=st.data(), limit=st.integers(1, 10))
    def sweeper_runs(self, data: st.DataObject, limit: int) -> None:
        """The periodic sweeper: maybe time passes to (about) a hold's expiry, then every account
        (opened or not) is swept before anything else touches it."""
        expiries = self._hold_expiries()
        move: bool = bool(expiries) and data.draw(st.booleans(), label="move to a hold's expiry")
        if move:
            exp = data.draw(st.sampled_from(expiries), label="expiry")
            delta = data.draw(st.sampled_from([-1, 0, 1]) | st.integers(0, 3_600_000), label="delta")
            self._set_time(max(self.now, exp + delta))
        for account in ACCOUNTS:
            self._both("sweep_account", account, limit)

    @precondition(lambda self: bool(self.recorded))
    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        """Repeat an earlier call that carried a request id, parameters unchanged."""
        name, args, kwargs = data.draw(st.sampled_from(self.recorded), label="earlier call")
        self._both(name, *args, **dict(kwargs))

    # -- rules: time -------------------------------------------------------------------------

    @rule(ms=st.integers(1, 10 * MINUTE_MS) | st.integers(1, 2_000) | st.integers(-2 * MINUTE_MS, -1))
    def tick(self, ms: int) -> None:
        """Time moves on a little; or back a little (another server's clock is behind: the
        wallet's periods must never move back)."""
        self._set_time(self.now + ms)

    @rule(kind=st.sampled_from(["next_day", "month_end", "just_before_month_end", "two_months",
                                "hold_expiry"]),
          offset=st.integers(0, DAY_MS - 1))
    def jump(self, kind: str, offset: int) -> None:
        month = month_index(self.now)
        expiries = self._hold_expiries()
        if kind == "next_day":  # just past the next UTC midnight
            target = (self.now // DAY_MS + 1) * DAY_MS + offset % (2 * 3_600_000)
        elif kind == "month_end":  # into the next month
            target = month_end_ms(month) + offset
        elif kind == "just_before_month_end":  # the last minutes of this month (holds then cross)
            target = month_end_ms(month) - 1 - offset % (10 * MINUTE_MS)
        elif kind == "hold_expiry" and expiries:  # one ms before, at, or after an expiry
            target = expiries[offset % len(expiries)] + offset % 3 - 1
        elif kind == "hold_expiry":
            target = self.now + offset % MINUTE_MS
        else:  # two month ends at once: the rollover is lost
            target = month_end_ms(month + 1) + offset
        self._set_time(max(self.now, target))

    # -- comparisons after every step --------------------------------------------------------

    def _ref_dump(self) -> dict[str, Any]:
        store = self.ref.store
        assert isinstance(store, ReferenceStore)
        out: dict[str, Any] = {}
        for ks in self.keysets.values():
            account = store.accounts.get(ks.account)
            out[ks.account] = {f: str(v) for f, v in account.items()} if account else None
            holds = store.holds.get(ks.holds) or {}
            out[ks.holds] = {h: x.encode() for h, x in holds.items()} or None
            out[ks.hold_expiry] = {h: x.exp for h, x in holds.items()} or None
            for rid in STORED_IDS:
                out[ks.idempotency + rid] = store.idempotency.get(ks.idempotency + rid)
        for sweep, journal in self.shard_keys:
            out[sweep] = dict(store.sweep.get(sweep) or {}) or None
            out[journal] = list(store.journals.get(journal, [])) or None
        return out

    async def _lua_dump(self) -> dict[str, Any]:
        client = self.lua.store.redis  # type: ignore[attr-defined]
        pipe = client.pipeline(transaction=False)
        kinds: list[tuple[str, str]] = []
        for ks in self.keysets.values():
            kinds += [(ks.account, "hash"), (ks.holds, "hash"), (ks.hold_expiry, "zset")]
            kinds += [(ks.idempotency + rid, "string") for rid in STORED_IDS]
        for sweep, journal in self.shard_keys:
            kinds += [(sweep, "zset"), (journal, "stream")]
        for key, kind in kinds:
            if kind == "hash":
                pipe.hgetall(key)
            elif kind == "zset":
                pipe.zrange(key, 0, -1, withscores=True)
            elif kind == "string":
                pipe.get(key)
            else:
                pipe.xrange(key)
        values = await pipe.execute()
        out: dict[str, Any] = {}
        for (key, kind), value in zip(kinds, values, strict=True):
            if kind == "zset":
                value = {m: int(s) for m, s in value}
            elif kind == "stream":
                value = [fields for _, fields in value]
            out[key] = value or None
        stray = {k async for k in client.scan_iter(match=f"{self.prefix}:*", count=1000)} - set(out)
        assert not stray, f"keys outside the wallet's key set: {sorted(stray)}"
        return out

    async def _compare_stores(self) -> dict[str, Any]:
        ref, lua = self._ref_dump(), await self._lua_dump()
        for key in ref:
            assert ref[key] == lua[key], f"{key}:\n  reference: {ref[key]!r}\n  lua:       {lua[key]!r}"
        return lua

    async def _compare_journals(self) -> dict[str, list[JournalEntry]]:
        journals = {}
        for account in ACCOUNTS:
            ref, lua = await journal_of(self.ref, account), await journal_of(self.lua, account)
            assert ref == lua, f"journal of {account}:\n  reference: {ref!r}\n  lua:       {lua!r}"
            journals[account] = lua
        return journals

    def _check_lua_invariants(self, dump: dict[str, Any], journals: dict[str, list[JournalEntry]]) -> None:
        for account, ks in self.keysets.items():
            entries = journals[account]
            fields = dump[ks.account]
            if fields is None:
                assert not entries, f"{account}: journal entries without an account"
                continue
            a = {f: int(v) for f, v in fields.items() if f not in ("plan", "np")}
            assert min(a["r"], a["m"], a["b"], a["p"], a["h"]) >= 0, f"{account}: negative bucket {a}"
            available = a["r"] + a["m"] + a["b"] + a["p"]
            assert sum(e.delta for e in entries) == available + a["h"], f"{account}: conservation"
            charged = -sum(e.delta for e in entries if e.kind in ("usage", "settle"))
            assert charged == a["used"], f"{account}: usage {charged} != used {a['used']}"
            assert [e.seq for e in entries] == list(range(1, a["seq"] + 1)), f"{account}: seq gap"
            if entries:
                assert (entries[-1].available_after, entries[-1].held_after) == (available, a["h"])
            holds = dump[ks.holds] or {}
            assert sum(int(x.split(":")[0]) for x in holds.values()) == a["h"], f"{account}: held"
            assert set(holds) == set(dump[ks.hold_expiry] or {}), f"{account}: hold expiry index"

    async def _compare(self) -> None:
        await self._compare_stores()
        balances: dict[str, Any] = {}
        if not self.just_moved:  # balance() resets lazily: not right after a clock move
            for account in sorted(self.opened):
                ref = await self._call_captured(self.ref, "balance", account)
                lua = await self._call_captured(self.lua, "balance", account)
                assert ref == lua, f"balance({account!r}):\n  reference: {ref!r}\n  lua:       {lua!r}"
                balances[account] = lua[1]
        dump = await self._compare_stores()
        journals = await self._compare_journals()
        self._check_lua_invariants(dump, journals)
        for account, entries in journals.items():
            for e in entries[self.journaled.get(account, 0):]:
                note = f" ({e.note})" if e.kind in ("expiry", "release") else ""
                self.stats[f"journal: {e.kind}{note}"] += 1
            self.journaled[account] = len(entries)
        for account, bal in balances.items():
            entries = journals[account]
            assert min(bal.rollover_tokens, bal.monthly_remaining, bal.bonus_tokens, bal.premium_tokens,
                       bal.reserved_tokens, bal.used_tokens) >= 0, f"{account}: negative {bal}"
            assert sum(e.delta for e in entries) == bal.remaining_tokens + bal.reserved_tokens
            assert -sum(e.delta for e in entries if e.kind in ("usage", "settle")) == bal.used_tokens

    @staticmethod
    async def _call_captured(meter: Meter, name: str, *args: Any) -> tuple[Any, ...]:
        try:
            return ("ok", await getattr(meter, name)(*args))
        except Exception as exc:  # any exception is an outcome to compare
            return _outcome_error(exc)

    @invariant()
    def sides_agree(self) -> None:
        self.loop.run_until_complete(self._compare())


SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_lua_matches_reference_model(lua_backend: str) -> None:
    stats: Counter[str] = Counter()
    try:
        # a factory is fine (documented), though the annotation says a class
        run_state_machine_as_test(lambda: ParityMachine(lua_backend, stats),  # type: ignore[arg-type]
                                  settings=SETTINGS)
    finally:  # what the run exercised: shown with `pytest -rP` (or -s)
        print(f"parity vs {lua_backend}: {EXAMPLES} examples x {STEPS} steps; outcomes seen:")
        for label, n in sorted(stats.items()):
            print(f"  {n:6d}  {label}")
