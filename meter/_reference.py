"""The reference model: the wallet's semantics stated once, in plain Python, with no I/O.

`ReferenceStore` answers the same calls as the Lua scripts (same KEYS, ARGV and replies), on
dictionaries instead of Redis. The parity tests drive it and the Lua side by side and compare
every reply, balance and journal entry. It is also a usable in-memory store for a `Meter`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from meter import _wire as wire

__all__ = ["ACCOUNT_FIELDS", "ReferenceStore"]

DAY_MS = 86_400_000
MINUTE_US = 60_000_000
LAZY_HOLDS = 8

ACCOUNT_FIELDS, TEXT_FIELDS, NUMERIC_FIELDS = wire.ACCOUNT_FIELDS, wire.TEXT_FIELDS, wire.NUMERIC_FIELDS
_Hold = wire.Hold


@dataclass(slots=True)
class _Call:
    """One script invocation: the common ARGV prefix and the account being worked on."""

    keys: Sequence[str]
    account_id: str
    now: int
    month: int
    day: int
    request_id: str
    fingerprint: str
    a: dict[str, Any] = field(default_factory=dict)
    entries: list[dict[str, str]] = field(default_factory=list)  # journaled by this call

    @property
    def live_key(self) -> str | None:
        """KEYS[7]: the shard's verified set, given when the meter can rehydrate."""
        return self.keys[6] if len(self.keys) > 6 else None


class ReferenceStore:
    """In-memory wallet with the Lua scripts' exact semantics. Keys are the Lua KEYS."""

    def __init__(self) -> None:
        self.accounts: dict[str, dict[str, Any]] = {}
        self.holds: dict[str, dict[str, _Hold]] = {}
        self.sweep: dict[str, dict[str, int]] = {}
        self.journals: dict[str, list[dict[str, str]]] = {}
        self.idempotency: dict[str, str] = {}
        # lua: the verified set, in Redis memory only (never in the AOF): empty after a restart
        self.live: dict[str, set[str]] = {}

    # -- entry point (same shape as the Redis store) ---------------------------------------------

    async def call(self, op: str, keys: Sequence[str], argv: Sequence[str | int]) -> list[Any]:
        return self.execute(op, keys, [str(x) for x in argv])

    async def close(self) -> None:
        return None

    def execute(self, op: str, keys: Sequence[str], argv: Sequence[str]) -> list[Any]:
        c = _Call(keys, argv[0], int(argv[1]), int(argv[2]), int(argv[3]), argv[4], argv[5])
        handler = getattr(self, f"_op_{op}")
        result: list[Any] = handler(c, argv[6:])
        return result

    def journal_of(self, journal_key: str) -> list[dict[str, str]]:
        return self.journals.get(journal_key, [])

    # -- the shared rules (mirror lua/_wallet.lua) -----------------------------------------------

    def _load(self, c: _Call) -> bool:
        stored = self.accounts.get(c.keys[0])
        if stored is None:
            return False
        c.a = dict(stored)
        return True

    def _unverified(self, c: _Call) -> bool:
        return c.live_key is not None and c.account_id not in self.live.get(c.live_key, set())

    def _mark_live(self, c: _Call) -> None:
        if c.live_key is not None:
            self.live.setdefault(c.live_key, set()).add(c.account_id)

    def _save(self, c: _Call) -> None:
        self.accounts[c.keys[0]] = c.a

    @staticmethod
    def _available(a: dict[str, Any]) -> int:
        return int(a["r"] + a["m"] + a["b"] + a["p"])

    def _journal(self, c: _Call, kind: str, dr: int, dm: int, db: int, dp: int, dh: int,
                 extra: Sequence[tuple[str, str]] = ()) -> int:
        a = c.a
        a["seq"] += 1
        e = {"t": kind, "a": c.account_id, "n": f"{a['seq']}:{c.now}:{dr}:{dm}:{db}:{dp}:{dh}",
             "st": wire.encode_state(a)}
        if c.request_id:
            e["rq"] = c.request_id
        for k, v in extra:
            if v:
                e[k] = v
        self.journals.setdefault(c.keys[4], []).append(e)
        c.entries.append(e)
        return int(a["seq"])

    @staticmethod
    def _pct_of(n: int, pct: int) -> int:
        return n * pct // 100

    def _roll_period(self, c: _Call) -> None:
        a = c.a
        if c.month > a["per"]:
            old_r, old_m = a["r"], a["m"]
            rolled = self._pct_of(old_m, a["rpct"]) if c.month == a["per"] + 1 else 0
            if old_r + old_m - rolled > 0:
                a["r"], a["m"] = 0, rolled
                self._journal(c, "expiry", -old_r, rolled - old_m, 0, 0, 0, [("nt", "period end")])
            if rolled > 0:
                a["r"], a["m"] = rolled, 0
                self._journal(c, "rollover", rolled, -rolled, 0, 0, 0)
            a["r"], a["m"] = rolled, 0
            if a["np"]:  # a downgrade or cancel waits for the period boundary
                self._apply_plan(a, a["np"])
                a["np"] = ""
            if a["allow"] > 0:
                a["m"] = a["allow"]
                self._journal(c, "allowance", 0, a["allow"], 0, 0, 0, [("nt", "monthly allowance")])
            a["per"] = c.month
        if c.day > a["day"]:
            a["day"], a["rq"], a["ut"] = c.day, 0, 0

    @staticmethod
    def _apply_plan(a: dict[str, Any], spec: str) -> None:
        a["plan"], limits = wire.parse_plan_spec(spec)
        a.update(limits)

    @staticmethod
    def _burn(a: dict[str, Any], n: int) -> tuple[int, int, int, int]:
        taken = []
        for bucket in ("r", "m", "b", "p"):
            t = min(a[bucket], n)
            a[bucket] -= t
            n -= t
            taken.append(t)
        return taken[0], taken[1], taken[2], taken[3]

    def _holds(self, c: _Call) -> dict[str, _Hold]:
        return self.holds.setdefault(c.keys[1], {})

    def _close_hold(self, c: _Call, hid: str, hold: _Hold, charge: int, kind: str, extra_take: int,
                    meta: Sequence[tuple[str, str]] = ()) -> int:
        a = c.a
        charged = []
        left = charge
        for portion in (hold.r, hold.m, hold.b, hold.p):
            t = min(portion, left)
            left -= t
            charged.append(t)
        cr, cm, cb, cp = charged
        rr, rm, rb, rp = hold.r - cr, hold.m - cm, hold.b - cb, hold.p - cp
        gone = 0
        if hold.per < a["per"] and rr + rm > 0:
            gone = rr + rm
            rr = rm = 0
            a["h"] -= gone
            self._journal(c, "expiry", 0, 0, 0, 0, -gone, [("hl", hid), ("nt", "held across period end")])
        xr = xm = xb = xp = 0
        if extra_take > 0:
            xr, xm, xb, xp = self._burn(a, extra_take)
        from_hold = hold.tokens - gone
        a["r"] += rr
        a["m"] += rm
        a["b"] += rb
        a["p"] += rp
        a["h"] -= from_hold
        self._journal(c, kind, rr - xr, rm - xm, rb - xb, rp - xp, -from_hold, [*meta, ("hl", hid)])
        del self._holds(c)[hid]
        return cr + cm + cb + cp

    def _expire_holds(self, c: _Call, limit: int) -> int:
        if c.a["h"] == 0:
            return 0
        holds = self._holds(c)
        due = sorted((h.exp, hid) for hid, h in holds.items() if h.exp <= c.now)[:limit]
        for _, hid in due:
            self._close_hold(c, hid, holds[hid], 0, "release", 0, [("nt", "hold expired")])
        return len(due)

    @staticmethod
    def _admit(c: _Call) -> tuple[str, int]:
        a = c.a
        if a["dcap"] > 0 and a["rq"] >= a["dcap"]:
            return "daily_cap", (a["day"] + 1) * DAY_MS - c.now
        if a["rpm"] > 0:
            interval = MINUTE_US // a["rpm"]
            tolerance = MINUTE_US - interval
            now_us = c.now * 1000
            tat = max(a["tat"], now_us)
            if tat - now_us > tolerance:
                return "rate_limited", (tat - tolerance - now_us + 999) // 1000
        return "ok", 0

    @staticmethod
    def _count_request(c: _Call) -> None:
        a = c.a
        a["rq"] += 1
        a["treq"] += 1
        if a["rpm"] > 0:
            a["tat"] = max(a["tat"], c.now * 1000) + MINUTE_US // a["rpm"]

    def _reply(self, c: _Call, code: str, id_: int, retry: int, x1: int = 0, x2: int = 0) -> list[Any]:
        a = c.a
        return [code, str(id_), self._available(a), a["h"], a["rq"], a["ut"], retry, 0, a["dcap"], x1, x2]

    def _replay(self, c: _Call) -> list[Any] | None:
        if not c.request_id:
            return None
        stored = self.idempotency.get(c.keys[5])
        if stored is None:
            return None
        fp, _, body = stored.partition("\n")
        if fp != c.fingerprint:
            return ["conflict"]
        out: list[Any] = body.split("\t")
        out[wire.AVAILABLE:] = [int(x) for x in out[wire.AVAILABLE:]]
        out[wire.REPLAYED] = 1
        return out

    def _commit(self, c: _Call, out: list[Any] | None = None, holds_changed: bool = False) -> None:
        self._save(c)
        if out is not None and c.request_id:
            record = c.fingerprint + "\n" + "\t".join(str(v) for v in out)
            if c.entries:  # on the call's last entry, so rehydration can restore it
                c.entries[-1]["ik"] = record
            self.idempotency[c.keys[5]] = record
        if holds_changed:
            sweep = self.sweep.setdefault(c.keys[3], {})
            holds = self._holds(c)
            if c.a["h"] == 0:
                sweep.pop(c.account_id, None)
            elif holds:
                sweep[c.account_id] = min(h.exp for h in holds.values())

    # -- operations (mirror lua/wallet_*.lua) ----------------------------------------------------

    def _op_open(self, c: _Call, args: Sequence[str]) -> list[Any]:
        if self._load(c):
            return self._reply(c, "exists", c.a["seq"], 0)
        if len(args) > 6 and args[6] == "probe":  # missing: the meter asks the database first
            return ["no_account"]
        a: dict[str, Any] = dict.fromkeys(NUMERIC_FIELDS, 0)
        a.update(np="", plan=args[0], allow=int(args[1]), dcap=int(args[2]), rpm=int(args[3]),
                 maxreq=int(args[4]), rpct=int(args[5]), per=c.month, day=c.day, created=c.now)
        c.a = a
        seq = 0
        if a["allow"] > 0:
            a["m"] = a["allow"]
            seq = self._journal(c, "allowance", 0, a["allow"], 0, 0, 0,
                                [("nt", f"welcome: {a['plan']} plan allowance")])
        self._commit(c)
        self._mark_live(c)
        return self._reply(c, "ok", seq, 0)

    def _spend_prelude(self, c: _Call, tokens: int) -> tuple[list[Any] | None, int]:
        """Shared head of debit and reserve: replay, account, maximum, resets, limits."""
        prior = self._replay(c)
        if prior is not None:
            return prior, 0
        if not self._load(c):
            return ["no_account"], 0
        if self._unverified(c):
            return ["verify"], 0
        if tokens > c.a["maxreq"]:
            return ["over_max", "0", 0, 0, 0, 0, 0, 0, 0, c.a["maxreq"], 0], 0
        self._roll_period(c)
        expired = self._expire_holds(c, LAZY_HOLDS)
        code, retry = self._admit(c)
        if code == "ok" and self._available(c.a) < tokens:
            code = "insufficient"
        if code != "ok":
            self._commit(c, holds_changed=expired > 0)
            return self._reply(c, code, 0, retry, tokens), expired
        return None, expired

    def _op_debit(self, c: _Call, args: Sequence[str]) -> list[Any]:
        tokens = int(args[0])
        early, expired = self._spend_prelude(c, tokens)
        if early is not None:
            return early
        a = c.a
        tr, tm, tb, tp = self._burn(a, tokens)
        self._count_request(c)
        a["ut"] += tokens
        a["used"] += tokens
        seq = self._journal(c, "usage", -tr, -tm, -tb, -tp, 0,
                            [("ag", args[1]), ("mo", args[2]), ("in", args[3]), ("ou", args[4]),
                             ("pj", args[5])])
        out = self._reply(c, "ok", seq, 0, tokens)
        self._commit(c, out, holds_changed=expired > 0)
        return out

    def _op_reserve(self, c: _Call, args: Sequence[str]) -> list[Any]:
        tokens, ttl = int(args[0]), int(args[1])
        early, _ = self._spend_prelude(c, tokens)
        if early is not None:
            return early
        a = c.a
        tr, tm, tb, tp = self._burn(a, tokens)
        self._count_request(c)
        a["h"] += tokens
        expires = c.now + ttl
        seq = self._journal(c, "hold", -tr, -tm, -tb, -tp, tokens,
                            [("ag", args[2]), ("mo", args[3]), ("pj", args[4]),
                             ("hx", str(expires))])
        self._holds(c)[str(seq)] = _Hold(tokens, tr, tm, tb, tp, a["per"], expires)
        out = self._reply(c, "ok", seq, 0, tokens, expires)
        self._commit(c, out, holds_changed=True)
        return out

    def _hold_prelude(self, c: _Call, hid: str) -> tuple[list[Any] | None, _Hold | None]:
        prior = self._replay(c)
        if prior is not None:
            return prior, None
        if not self._load(c):
            return ["no_account"], None
        if self._unverified(c):
            return ["verify"], None
        self._roll_period(c)
        expired = self._expire_holds(c, LAZY_HOLDS)
        hold = self._holds(c).get(hid)
        if hold is None:
            self._commit(c, holds_changed=expired > 0)
            return self._reply(c, "no_hold", 0, 0), None
        return None, hold

    def _op_settle(self, c: _Call, args: Sequence[str]) -> list[Any]:
        hid, actual = args[0], int(args[1])
        early, hold = self._hold_prelude(c, hid)
        if early is not None or hold is None:
            return early or []
        a = c.a
        extra = max(actual - hold.tokens, 0)
        take = min(extra, self._available(a))
        charged = min(actual, hold.tokens) + take
        a["ut"] += charged
        a["used"] += charged
        self._close_hold(c, hid, hold, actual, "settle", take,
                         [("ag", args[2]), ("mo", args[3]), ("in", args[4]), ("ou", args[5]),
                          ("pj", args[6])])
        out = self._reply(c, "ok", a["seq"], 0, charged, extra - take)
        self._commit(c, out, holds_changed=True)
        return out

    def _op_release(self, c: _Call, args: Sequence[str]) -> list[Any]:
        hid = args[0]
        early, hold = self._hold_prelude(c, hid)
        if early is not None or hold is None:
            return early or []
        before = self._available(c.a)
        self._close_hold(c, hid, hold, 0, "release", 0)
        out = self._reply(c, "ok", c.a["seq"], 0, self._available(c.a) - before)
        self._commit(c, out, holds_changed=True)
        return out

    def _op_credit(self, c: _Call, args: Sequence[str]) -> list[Any]:
        bucket, tokens, kind, note, ref = args[0], int(args[1]), args[2], args[3], args[4]
        prior = self._replay(c)
        if prior is not None:
            return prior
        if not self._load(c):
            return ["no_account"]
        if self._unverified(c):
            return ["verify"]
        if c.a[bucket] + tokens >= 2**53:
            return ["overflow"]
        self._roll_period(c)
        expired = self._expire_holds(c, LAZY_HOLDS)
        c.a[bucket] += tokens
        db, dp = (tokens, 0) if bucket == "b" else (0, tokens)
        seq = self._journal(c, kind, 0, 0, db, dp, 0, [("nt", note), ("rf", ref)])
        out = self._reply(c, "ok", seq, 0, tokens)
        self._commit(c, out, holds_changed=expired > 0)
        return out

    def _op_balance(self, c: _Call, args: Sequence[str]) -> list[Any]:
        if not self._load(c):
            return ["no_account"]
        if self._unverified(c):
            return ["verify"]
        self._roll_period(c)
        expired = self._expire_holds(c, LAZY_HOLDS)
        self._commit(c, holds_changed=expired > 0)
        out: list[Any] = ["ok"]
        for f in ACCOUNT_FIELDS:
            out += [f, str(c.a[f])]
        return out

    def _begin(self, c: _Call) -> tuple[list[Any] | None, int]:
        """The head of a mutating call (lua: begin()): a replay or conflict, no account, or the
        account after its lazy resets (with how many holds expired)."""
        prior = self._replay(c)
        if prior is not None:
            return prior, 0
        if not self._load(c):
            return ["no_account"], 0
        if self._unverified(c):
            return ["verify"], 0
        self._roll_period(c)
        return None, self._expire_holds(c, LAZY_HOLDS)

    def _op_plan(self, c: _Call, args: Sequence[str]) -> list[Any]:
        early, expired = self._begin(c)
        if early is not None:
            return early
        a = c.a
        spec = ":".join(args[0:6])
        dm = 0
        if args[6] == "next":
            a["np"] = spec
            seq = self._journal(c, "adjustment", 0, 0, 0, 0, 0,
                                [("nt", f"plan {args[0]} from next period: {args[7]}")])
        else:
            used = max(a["allow"] - a["m"], 0)
            new_m = max(int(args[1]) - used, 0)
            dm = new_m - a["m"]
            self._apply_plan(a, spec)
            a["np"] = ""
            a["m"] = new_m
            seq = self._journal(c, "allowance" if dm >= 0 else "adjustment", 0, dm, 0, 0, 0,
                                [("nt", f"plan {args[0]} now: {args[7]}")])
        out = self._reply(c, "ok", seq, 0, dm)
        self._commit(c, out, holds_changed=expired > 0)
        return out

    def _op_adjust(self, c: _Call, args: Sequence[str]) -> list[Any]:
        bucket, tokens = args[0], int(args[1])
        early, expired = self._begin(c)
        if early is not None:
            return early
        a = c.a
        tr = tm = tb = tp = 0
        if bucket == "*":
            tr, tm, tb, tp = self._burn(a, min(tokens, self._available(a)))
        elif bucket == "b":
            tb = min(tokens, a["b"])
            a["b"] -= tb
        else:
            tp = min(tokens, a["p"])
            a["p"] -= tp
        taken = tr + tm + tb + tp
        seq = 0
        if taken > 0:
            seq = self._journal(c, args[2], -tr, -tm, -tb, -tp, 0, [("nt", args[3]), ("rf", args[4])])
        out = self._reply(c, "ok", seq, 0, taken, tokens - taken)
        self._commit(c, out, holds_changed=expired > 0)
        return out

    def _op_sweep(self, c: _Call, args: Sequence[str]) -> list[Any]:
        if not self._load(c):
            self.sweep.get(c.keys[3], {}).pop(c.account_id, None)
            return ["no_account"]
        if self._unverified(c):
            return ["verify"]
        self._roll_period(c)
        n = self._expire_holds(c, int(args[0]))
        self._commit(c, holds_changed=True)
        return ["ok", n]

    def _op_load(self, c: _Call, args: Sequence[str]) -> list[Any]:
        """lua/wallet_load.lua: load when missing or behind the snapshot, else keep; mark verified."""
        fields: dict[str, str] = {}
        holds: dict[str, _Hold] = {}
        idem: list[tuple[str, str]] = []
        for k, v in zip(args[0::2], args[1::2], strict=True):
            if k.startswith("hold:"):
                holds[k[5:]] = _Hold.parse(v)
            elif k.startswith("idem:"):
                idem.append((c.keys[int(k[5:]) - 1], v))
            else:
                fields[k] = v
        code, lost, since = "ok", 0, 0
        stored = self.accounts.get(c.keys[0])
        if stored is not None:
            if "seq" not in fields or int(fields["seq"]) <= stored["seq"]:
                self._mark_live(c)
                self._restore_idempotency(idem)
                return ["exists", 0]
            code, lost, since = "replaced", int(fields["seq"]) - stored["seq"], stored["seq"]
            del self.accounts[c.keys[0]]
            self.holds.pop(c.keys[1], None)
            self.sweep.get(c.keys[3], {}).pop(c.account_id, None)
        elif "seq" not in fields:
            return ["no_account"]
        a: dict[str, Any] = dict.fromkeys(NUMERIC_FIELDS, 0)
        a["np"] = ""
        for k, v in fields.items():
            a[k] = v if k in TEXT_FIELDS else int(v)
        self.accounts[c.keys[0]] = a
        c.a = dict(a)
        holds_changed = False
        if a["h"] > 0:
            holds_changed = True
            if sum(h.tokens for h in holds.values()) == a["h"]:  # the open holds come back
                self._holds(c).update(holds)
            else:  # unknown or inconsistent: the held tokens come back as bonus
                gone = c.a["h"]
                c.a["h"] = 0
                c.a["b"] += gone
                self._journal(c, "release", 0, 0, gone, 0, -gone,
                              [("nt", "hold lost with Redis data; returned as bonus")])
        if code == "replaced":
            self._journal(c, "adjustment", 0, 0, 0, 0, 0,
                          [("nt", f"redis lost entries {since + 1}-{fields['seq']}; state loaded from the ledger")])
        self._commit(c, holds_changed=holds_changed)
        self._mark_live(c)
        self._restore_idempotency(idem)
        return [code, lost]

    def _restore_idempotency(self, records: Sequence[tuple[str, str]]) -> None:
        for key, value in records:  # '<ttl_s>:<record>'; a record already there stays (SET NX)
            self.idempotency.setdefault(key, value.partition(":")[2])
