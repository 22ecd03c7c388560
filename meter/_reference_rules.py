"""The reference model's shared rules: account state, the period roll, burning, holds, admission
and idempotency, in plain Python (mirror lua/_wallet.lua). The operations are in `meter._reference`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from meter import _wire as wire

__all__ = ["ACCOUNT_FIELDS", "DAY_MS", "LAZY_HOLDS", "MINUTE_US", "NUMERIC_FIELDS", "TEXT_FIELDS", "Call",
           "Hold", "ReferenceWallet"]

DAY_MS = 86_400_000
MINUTE_US = 60_000_000
LAZY_HOLDS = 8

ACCOUNT_FIELDS, TEXT_FIELDS, NUMERIC_FIELDS = wire.ACCOUNT_FIELDS, wire.TEXT_FIELDS, wire.NUMERIC_FIELDS
Hold = wire.Hold


@dataclass(slots=True)
class Call:
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


class ReferenceWallet:
    """The wallet's state on dictionaries and the rules every operation shares. Keys are the Lua KEYS."""

    def __init__(self) -> None:
        self.accounts: dict[str, dict[str, Any]] = {}
        self.holds: dict[str, dict[str, Hold]] = {}
        self.sweep: dict[str, dict[str, int]] = {}
        self.journals: dict[str, list[dict[str, str]]] = {}
        self.idempotency: dict[str, str] = {}
        # lua: the verified set, in Redis memory only (never in the AOF): empty after a restart
        self.live: dict[str, set[str]] = {}

    def journal_of(self, journal_key: str) -> list[dict[str, str]]:
        return self.journals.get(journal_key, [])

    # -- the shared rules (mirror lua/_wallet.lua) -----------------------------------------------

    def _load(self, c: Call) -> bool:
        stored = self.accounts.get(c.keys[0])
        if stored is None:
            return False
        c.a = dict(stored)
        return True

    def _unverified(self, c: Call) -> bool:
        return c.live_key is not None and c.account_id not in self.live.get(c.live_key, set())

    def _mark_live(self, c: Call) -> None:
        if c.live_key is not None:
            self.live.setdefault(c.live_key, set()).add(c.account_id)

    def _save(self, c: Call) -> None:
        self.accounts[c.keys[0]] = c.a

    @staticmethod
    def _available(a: dict[str, Any]) -> int:
        return int(a["r"] + a["m"] + a["b"] + a["p"])

    def _journal(self, c: Call, kind: str, dr: int, dm: int, db: int, dp: int, dh: int,
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

    def _roll_period(self, c: Call) -> None:
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
            a["mg"] = a["allow"]
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

    def _holds(self, c: Call) -> dict[str, Hold]:
        return self.holds.setdefault(c.keys[1], {})

    def _close_hold(self, c: Call, hid: str, hold: Hold, charge: int, kind: str, extra_take: int,
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

    def _expire_holds(self, c: Call, limit: int) -> int:
        if c.a["h"] == 0:
            return 0
        holds = self._holds(c)
        due = sorted((h.exp, hid) for hid, h in holds.items() if h.exp <= c.now)[:limit]
        for _, hid in due:
            self._close_hold(c, hid, holds[hid], 0, "release", 0, [("nt", "hold expired")])
        return len(due)

    @staticmethod
    def _admit(c: Call) -> tuple[str, int]:
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
    def _count_request(c: Call) -> None:
        a = c.a
        a["rq"] += 1
        a["treq"] += 1
        if a["rpm"] > 0:
            a["tat"] = max(a["tat"], c.now * 1000) + MINUTE_US // a["rpm"]

    def _reply(self, c: Call, code: str, id_: int, retry: int, x1: int = 0, x2: int = 0) -> list[Any]:
        a = c.a
        return [code, str(id_), self._available(a), a["h"], a["rq"], a["ut"], retry, 0, a["dcap"], x1, x2]

    def _replay(self, c: Call) -> list[Any] | None:
        if not c.request_id:
            return None
        stored = self.idempotency.get(c.keys[5])
        if stored is None:
            return None
        fp, _, body = stored.partition("\n")
        if fp != c.fingerprint and not (len(fp) == 24 and fp[:16] == c.fingerprint):  # 24: the older form
            return ["conflict"]
        out: list[Any] = body.split("\t")
        out[wire.AVAILABLE:] = [int(x) for x in out[wire.AVAILABLE:]]
        out[wire.REPLAYED] = 1
        return out

    def _commit(self, c: Call, out: list[Any] | None = None, holds_changed: bool = False) -> None:
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

    # -- call heads (shared by the operations) -------------------------------------------------------

    def _spend_prelude(self, c: Call, tokens: int) -> tuple[list[Any] | None, int]:
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

    def _hold_prelude(self, c: Call, hid: str) -> tuple[list[Any] | None, Hold | None]:
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

    def _begin(self, c: Call) -> tuple[list[Any] | None, int]:
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
