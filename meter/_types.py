"""Values the meter returns: decisions, receipts, balances, journal entries."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from meter import _wire as wire

__all__ = ["Balance", "Decision", "JournalEntry", "Receipt"]


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to a debit or a reserve. A denial is a Decision with allowed=False."""

    allowed: bool
    reason: str  # ok | insufficient | daily_cap | rate_limited
    tokens: int  # what was asked for
    remaining: int  # available tokens after the decision
    reserved: int  # tokens held by open reservations
    requests_today: int
    tokens_used_today: int
    daily_request_limit: int  # 0 = unlimited
    retry_after_ms: int  # > 0 on daily_cap and rate_limited
    replayed: bool  # the stored answer to an earlier call with the same request id
    transaction_id: str | None  # "<account>:<seq>", set when allowed
    hold_id: str | None = None  # reserve only
    expires_at_ms: int | None = None  # reserve only

    @property
    def shortage(self) -> int:
        """Tokens missing for an insufficient-balance denial (0 otherwise)."""
        return max(self.tokens - self.remaining, 0) if self.reason == "insufficient" else 0


@dataclass(frozen=True, slots=True)
class Receipt:
    """The answer to settle, release and credit."""

    transaction_id: str
    remaining: int
    reserved: int
    replayed: bool
    tokens: int = 0  # credit: tokens added; release: tokens returned
    charged: int = 0  # settle: tokens charged
    uncollected: int = 0  # settle: usage beyond the hold that the balance could not cover


@dataclass(frozen=True, slots=True)
class Balance:
    """An account's live balance: the brief's fields plus per-bucket figures."""

    account_id: str
    plan: str
    rollover_tokens: int
    monthly_remaining: int
    bonus_tokens: int
    premium_tokens: int
    reserved_tokens: int
    monthly_allowance: int
    used_tokens: int  # lifetime tokens charged
    requests_today: int
    tokens_used_today: int
    total_requests: int
    daily_request_limit: int
    requests_per_minute: int
    max_tokens_per_request: int
    month_reset_ms: int  # first millisecond of the next month (UTC)
    pending_plan: str = ""  # a downgrade or cancel that applies at the next period

    @property
    def remaining_tokens(self) -> int:
        return self.rollover_tokens + self.monthly_remaining + self.bonus_tokens + self.premium_tokens

    @property
    def total_tokens(self) -> int:
        return self.remaining_tokens + self.reserved_tokens + self.used_tokens

    @property
    def monthly_used(self) -> int:
        return max(self.monthly_allowance - self.monthly_remaining, 0)

    @property
    def monthly_used_percentage(self) -> float:
        # Display only (tokens stay integers): basis points, then one decimal place.
        if self.monthly_allowance == 0:
            return 0.0
        return (self.monthly_used * 1000 // self.monthly_allowance) / 10

    @property
    def premium_remaining(self) -> int:
        return self.premium_tokens

    @property
    def month_reset_date(self) -> str:
        return datetime.fromtimestamp(self.month_reset_ms // 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")

    def as_dict(self) -> dict[str, object]:
        """The brief's balance body, with per-bucket figures and limits added."""
        return {
            "account_id": self.account_id,
            "plan": self.plan,
            "total_tokens": self.total_tokens,
            "used_tokens": self.used_tokens,
            "remaining_tokens": self.remaining_tokens,
            "monthly_allowance": self.monthly_allowance,
            "monthly_used": self.monthly_used,
            "monthly_remaining": self.monthly_remaining,
            "monthly_used_percentage": self.monthly_used_percentage,
            "premium_tokens": self.premium_tokens,
            "premium_remaining": self.premium_remaining,
            "rollover_tokens": self.rollover_tokens,
            "bonus_tokens": self.bonus_tokens,
            "reserved_tokens": self.reserved_tokens,
            "month_reset_date": self.month_reset_date,
            "total_requests": self.total_requests,
            "requests_today": self.requests_today,
            "tokens_used_today": self.tokens_used_today,
            "daily_request_limit": self.daily_request_limit,
            "requests_per_minute": self.requests_per_minute,
            "max_tokens_per_request": self.max_tokens_per_request,
            "pending_plan": self.pending_plan or None,
        }


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One change to one account, as appended to its shard's journal stream."""

    kind: str  # allowance usage hold settle release expiry rollover purchase bonus grant refund adjustment
    account_id: str
    seq: int
    delta: int  # change of available + held
    rollover: int  # per-bucket deltas
    monthly: int
    bonus: int
    premium: int
    held: int
    available_after: int
    held_after: int
    ts_ms: int
    plan: str  # the account's state after this change, for snapshots:
    period: int  # month index
    rollover_after: int
    monthly_after: int
    bonus_after: int
    premium_after: int
    used_after: int  # lifetime tokens charged
    requests_after: int  # lifetime admitted requests
    request_id: str = ""
    agent: str = ""
    model: str = ""
    input_tokens: int | None = None
    output_tokens: int | None = None
    project_id: str = ""
    hold_id: str = ""
    note: str = ""
    reference: str = ""
    day: int = 0  # the daily counters after this change (entries older than them carry 0s)
    requests_today: int = 0
    tokens_used_today: int = 0
    idempotency_record: str = ""  # 'ik': the stored answer of the call, on its last entry
    hold_expires_ms: int | None = None  # 'hx' on a 'hold' entry (older ones: the note 'expires N')

    @property
    def transaction_id(self) -> str:
        return f"{self.account_id}:{self.seq}"

    @property
    def available_before(self) -> int:
        return self.available_after - (self.rollover + self.monthly + self.bonus + self.premium)

    @classmethod
    def from_fields(cls, f: dict[str, str]) -> JournalEntry:
        """Parse a stream entry's fields (raises KeyError/ValueError on a malformed entry)."""
        seq, ts, dr, dm, db, dp, dh = wire.parse_numbers(f)
        s = wire.parse_state(f["st"])
        return cls(
            kind=f["t"], account_id=f["a"], seq=seq, delta=dr + dm + db + dp + dh,
            rollover=dr, monthly=dm, bonus=db, premium=dp, held=dh,
            available_after=s.available, held_after=s.h, ts_ms=ts,
            plan=s.plan, period=s.per, rollover_after=s.r, monthly_after=s.m, bonus_after=s.b, premium_after=s.p,
            used_after=s.used, requests_after=s.treq,
            request_id=f.get("rq", ""), agent=f.get("ag", ""), model=f.get("mo", ""),
            input_tokens=int(f["in"]) if "in" in f else None,
            output_tokens=int(f["ou"]) if "ou" in f else None,
            project_id=f.get("pj", ""), hold_id=f.get("hl", ""), note=f.get("nt", ""),
            reference=f.get("rf", ""), day=s.day, requests_today=s.rq, tokens_used_today=s.ut,
            idempotency_record=f.get("ik", ""),
            hold_expires_ms=wire.hold_expiry(f.get("hx"), f.get("nt")) if f["t"] == "hold" else None,
        )
