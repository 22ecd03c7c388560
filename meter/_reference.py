"""The reference model: the wallet's semantics stated once, in plain Python, with no I/O.

`ReferenceStore` answers the same calls as the Lua scripts (same KEYS, ARGV and replies), on
dictionaries instead of Redis. The parity tests drive it and the Lua side by side and compare
every reply, balance and journal entry. It is also a usable in-memory store for a `Meter`.
The rules the operations share (mirror lua/_wallet.lua) are in `meter._reference_rules`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from meter._reference_rules import (
    ACCOUNT_FIELDS,
    LAZY_HOLDS,
    NUMERIC_FIELDS,
    TEXT_FIELDS,
    Call,
    Hold,
    ReferenceWallet,
)

__all__ = ["ACCOUNT_FIELDS", "ReferenceStore"]


class ReferenceStore(ReferenceWallet):
    """In-memory wallet with the Lua scripts' exact semantics. Keys are the Lua KEYS."""

    # -- entry point (same shape as the Redis store) ---------------------------------------------

    async def call(self, op: str, keys: Sequence[str], argv: Sequence[str | int]) -> list[Any]:
        return self.execute(op, keys, [str(x) for x in argv])

    async def close(self) -> None:
        return None

    def execute(self, op: str, keys: Sequence[str], argv: Sequence[str]) -> list[Any]:
        c = Call(keys, argv[0], int(argv[1]), int(argv[2]), int(argv[3]), argv[4], argv[5])
        handler = getattr(self, f"_op_{op}")
        result: list[Any] = handler(c, argv[6:])
        return result

    # -- operations (mirror lua/wallet_*.lua) ----------------------------------------------------

    def _op_open(self, c: Call, args: Sequence[str]) -> list[Any]:
        if self._load(c):
            return self._reply(c, "exists", c.a["seq"], 0)
        if len(args) > 6 and args[6] == "probe":  # missing: the meter asks the database first
            return ["no_account"]
        a: dict[str, Any] = dict.fromkeys(NUMERIC_FIELDS, 0)
        a.update(np="", plan=args[0], allow=int(args[1]), dcap=int(args[2]), rpm=int(args[3]),
                 maxreq=int(args[4]), rpct=int(args[5]), per=c.month, day=c.day, created=c.now)
        a["mg"] = a["allow"]
        c.a = a
        seq = 0
        if a["allow"] > 0:
            a["m"] = a["allow"]
            seq = self._journal(c, "allowance", 0, a["allow"], 0, 0, 0,
                                [("nt", f"welcome: {a['plan']} plan allowance")])
        self._commit(c)
        self._mark_live(c)
        return self._reply(c, "ok", seq, 0)

    def _op_debit(self, c: Call, args: Sequence[str]) -> list[Any]:
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

    def _op_usage(self, c: Call, args: Sequence[str]) -> list[Any]:
        tokens = int(args[0])
        early, expired = self._begin(c)
        if early is not None:
            return early
        a = c.a
        charged = min(tokens, self._available(a))
        tr, tm, tb, tp = self._burn(a, charged)
        self._count_request(c)
        a["ut"] += charged
        a["used"] += charged
        note = f"uncollected {tokens - charged}" if tokens > charged else ""
        seq = self._journal(c, "usage", -tr, -tm, -tb, -tp, 0,
                            [("ag", args[1]), ("mo", args[2]), ("in", args[3]), ("ou", args[4]),
                             ("pj", args[5]), ("nt", note)])
        out = self._reply(c, "ok", seq, 0, charged, tokens - charged)
        self._commit(c, out, holds_changed=expired > 0)
        return out

    def _op_reserve(self, c: Call, args: Sequence[str]) -> list[Any]:
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
        self._holds(c)[str(seq)] = Hold(tokens, tr, tm, tb, tp, a["per"], expires)
        out = self._reply(c, "ok", seq, 0, tokens, expires)
        self._commit(c, out, holds_changed=True)
        return out

    def _op_settle(self, c: Call, args: Sequence[str]) -> list[Any]:
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

    def _op_release(self, c: Call, args: Sequence[str]) -> list[Any]:
        hid = args[0]
        early, hold = self._hold_prelude(c, hid)
        if early is not None or hold is None:
            return early or []
        before = self._available(c.a)
        self._close_hold(c, hid, hold, 0, "release", 0)
        out = self._reply(c, "ok", c.a["seq"], 0, self._available(c.a) - before)
        self._commit(c, out, holds_changed=True)
        return out

    def _op_credit(self, c: Call, args: Sequence[str]) -> list[Any]:
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

    def _op_balance(self, c: Call, args: Sequence[str]) -> list[Any]:
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

    def _op_plan(self, c: Call, args: Sequence[str]) -> list[Any]:
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
            granted = max(a["mg"], a["allow"])  # granted this month (0: an account from before mg)
            used = max(granted - a["m"], 0)
            new_m = max(int(args[1]) - used, 0)
            dm = new_m - a["m"]
            self._apply_plan(a, spec)
            a["np"] = ""
            a["m"] = new_m
            a["mg"] = granted + dm
            seq = self._journal(c, "allowance" if dm >= 0 else "adjustment", 0, dm, 0, 0, 0,
                                [("nt", f"plan {args[0]} now: {args[7]}")])
        out = self._reply(c, "ok", seq, 0, dm)
        self._commit(c, out, holds_changed=expired > 0)
        return out

    def _op_adjust(self, c: Call, args: Sequence[str]) -> list[Any]:
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

    def _op_sweep(self, c: Call, args: Sequence[str]) -> list[Any]:
        if not self._load(c):
            self.sweep.get(c.keys[3], {}).pop(c.account_id, None)
            return ["no_account"]
        if self._unverified(c):
            return ["verify"]
        self._roll_period(c)
        n = self._expire_holds(c, int(args[0]))
        self._commit(c, holds_changed=True)
        return ["ok", n]

    def _op_load(self, c: Call, args: Sequence[str]) -> list[Any]:
        """lua/wallet_load.lua: load when missing or behind the snapshot, else keep; mark verified."""
        fields: dict[str, str] = {}
        holds: dict[str, Hold] = {}
        idem: list[tuple[str, str]] = []
        for k, v in zip(args[0::2], args[1::2], strict=True):
            if k.startswith("hold:"):
                holds[k[5:]] = Hold.parse(v)
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
