"""The Lua ↔ Python wire format, stated once: script reply slots, account hash fields, journal
entry fields and the hold record. Pure (no I/O).

Lua cannot import this module, so `lua/_wallet.lua` keeps its own literal copy; the parity tests
(tests/meter/test_wire.py) read the Lua text and run every script to keep the two the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

__all__ = [
    "ACCOUNT_FIELDS",
    "HOLD_FIELDS",
    "IDEMPOTENCY_TTL_S",
    "JOURNAL_FIELDS",
    "MAX_IDEMPOTENCY_TTL_S",
    "MIN_IDEMPOTENCY_TTL_S",
    "NUMBER_FIELDS",
    "NUMERIC_FIELDS",
    "PLAN_SPEC_FIELDS",
    "REPLY_SLOTS",
    "STATE_FIELDS",
    "TEXT_FIELDS",
    "Hold",
    "Reply",
    "State",
    "balances_after",
    "decode_reply",
    "encode_state",
    "hold_expiry",
    "parse_numbers",
    "parse_plan_spec",
    "parse_state",
    "pending_plan_id",
]

# -- the account hash (lua: FIELDS, TEXT) -------------------------------------------------------

ACCOUNT_FIELDS = ("plan", "allow", "dcap", "rpm", "maxreq", "rpct", "r", "m", "b", "p", "h",
                  "per", "day", "rq", "ut", "used", "treq", "tat", "seq", "created", "np", "mg")
# mg: monthly tokens granted this period (lua/wallet_plan.lua); 0 in accounts from before it
TEXT_FIELDS = frozenset({"plan", "np"})  # np: a plan change due at the next period, 'id:allow:dcap:rpm:max:pct'
NUMERIC_FIELDS = tuple(f for f in ACCOUNT_FIELDS if f not in TEXT_FIELDS)
PLAN_SPEC_FIELDS = ("plan", "allow", "dcap", "rpm", "maxreq", "rpct")  # lua: apply_plan, and 'np'


def parse_plan_spec(spec: str) -> tuple[str, dict[str, int]]:
    """'id:allow:dcap:rpm:max:pct' (a pending plan 'np', or the plan script's arguments) as the
    plan id and its limits by account field."""
    plan, *limits = spec.split(":")
    return plan, dict(zip(PLAN_SPEC_FIELDS[1:], map(int, limits), strict=True))


def pending_plan_id(np: str) -> str:
    """The plan id of a pending plan change ('' when none)."""
    return np.split(":", 1)[0]

# -- the reply of a mutating script (lua: reply()) ----------------------------------------------

REPLY_SLOTS = ("code", "id", "available", "held", "requests_today", "tokens_used_today",
               "retry_after_ms", "replayed", "daily_limit", "x1", "x2")
CODE, ID, AVAILABLE, HELD, REQUESTS_TODAY, TOKENS_USED_TODAY, RETRY_AFTER_MS, REPLAYED, \
    DAILY_LIMIT, X1, X2 = range(len(REPLY_SLOTS))


class Reply(NamedTuple):
    """A mutating script's reply by slot name. x1/x2 depend on the script (see its header)."""

    code: str
    id: str  # the entry's seq (the hold id for reserve); '0' when nothing was journaled
    available: int
    held: int
    requests_today: int
    tokens_used_today: int
    retry_after_ms: int
    replayed: bool
    daily_limit: int
    x1: int
    x2: int


def decode_reply(reply: Sequence[Any]) -> Reply:
    """A full reply (len(REPLY_SLOTS) values) as a `Reply`; ValueError on any other length."""
    if len(reply) != len(REPLY_SLOTS):
        raise ValueError(f"a wallet reply has {len(REPLY_SLOTS)} slots, got {len(reply)}: {reply!r}")
    return Reply(str(reply[CODE]), str(reply[ID]), int(reply[AVAILABLE]), int(reply[HELD]),
                 int(reply[REQUESTS_TODAY]), int(reply[TOKENS_USED_TODAY]), int(reply[RETRY_AFTER_MS]),
                 bool(int(reply[REPLAYED])), int(reply[DAILY_LIMIT]), int(reply[X1]), int(reply[X2]))


# -- the journal entry (lua: journal()) ---------------------------------------------------------

JOURNAL_FIELDS = {
    "t": "kind", "a": "account", "n": "numbers", "st": "state after",
    "rq": "request id", "ag": "agent", "mo": "model", "in": "input tokens", "ou": "output tokens",
    "pj": "project", "hl": "hold id", "nt": "note", "rf": "reference",
    "hx": "hold expiry (ms, on 'hold' entries)", "ik": "stored idempotency answer (the call's last entry)",
}
NUMBER_FIELDS = ("seq", "ts_ms", "rollover", "monthly", "bonus", "premium", "held")  # 'n', deltas
STATE_FIELDS = ("plan", "per", "r", "m", "b", "p", "h", "used", "treq", "day", "rq", "ut")  # 'st', after
_OLD_STATE_LEN = 9  # entries written before the daily counters (day:rq:ut) end at treq


def parse_numbers(fields: Mapping[str, str]) -> tuple[int, int, int, int, int, int, int]:
    """An entry's 'n' as (seq, ts_ms, dr, dm, db, dp, dh). Entries written before that field
    existed (still in a stream during an upgrade) carry q, ts and bk instead."""
    n = fields.get("n")
    raw = n if n is not None else f"{fields['q']}:{fields['ts']}:{fields['bk']}"
    seq, ts, dr, dm, db, dp, dh = map(int, raw.split(":"))
    return seq, ts, dr, dm, db, dp, dh


class State(NamedTuple):
    """An entry's 'st': the account's state after the change (what a snapshot needs)."""

    plan: str
    per: int
    r: int
    m: int
    b: int
    p: int
    h: int
    used: int
    treq: int
    day: int = 0  # 0s in entries written before the daily counters
    rq: int = 0
    ut: int = 0

    @property
    def available(self) -> int:
        return self.r + self.m + self.b + self.p


def parse_state(st: str) -> State:
    """Parse 'st' (ValueError when malformed); the older 9-field form gets 0 daily counters."""
    plan, *rest = st.split(":")
    if len(rest) + 1 not in (_OLD_STATE_LEN, len(STATE_FIELDS)):
        raise ValueError(f"'st' has {len(rest) + 1} fields, not {_OLD_STATE_LEN} or {len(STATE_FIELDS)}")
    return State(plan, *map(int, rest))


def balances_after(st: str) -> tuple[int, int]:
    """(available, held) from 'st' without parsing the rest: the flusher's inner loop."""
    _, _, r, m, b, p, h = st.split(":", 7)[:7]
    return int(r) + int(m) + int(b) + int(p), int(h)


def encode_state(account: Mapping[str, Any]) -> str:
    return ":".join(str(account[f]) for f in STATE_FIELDS)


IDEMPOTENCY_TTL_S = 86_400  # lua: IDEM_TTL_S, how long a call's answer is kept for a retry (the default)
MIN_IDEMPOTENCY_TTL_S, MAX_IDEMPOTENCY_TTL_S = 60, 7 * 86_400  # the range a deployment may set


# -- the hold record (lua: parse_hold; the holds hash, and 'hold:<id>' fields of the load script) --

HOLD_FIELDS = ("tokens", "r", "m", "b", "p", "per", "exp")


class Hold(NamedTuple):
    """'tokens:r:m:b:p:period:expires_ms': the tokens held and the buckets they came from."""

    tokens: int
    r: int
    m: int
    b: int
    p: int
    per: int
    exp: int

    def encode(self) -> str:
        return ":".join(map(str, self))

    @classmethod
    def parse(cls, raw: str) -> Hold:
        return cls(*map(int, raw.split(":")))


_OLD_EXPIRY_NOTE = "expires "  # before 'hx', the reserve script wrote the expiry into the note


def hold_expiry(hx: str | int | None, note: str | None) -> int | None:
    """A 'hold' entry's expiry (ms): its 'hx', or for entries written before 'hx' existed, the
    note 'expires N'. None when neither holds one."""
    if hx is not None and str(hx).isdigit():
        return int(hx)
    old = (note or "").removeprefix(_OLD_EXPIRY_NOTE)
    return int(old) if note and note.startswith(_OLD_EXPIRY_NOTE) and old.isdigit() else None
