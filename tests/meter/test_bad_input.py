"""Bad input is rejected before any write, with an error naming the field; nothing changes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from meter import InvalidInput, Meter
from tests.conftest import redis_dump

pytestmark = pytest.mark.redis

BAD_CALLS: list[tuple[str, str, Callable[[Meter], Awaitable[Any]]]] = [
    ("zero tokens", "tokens", lambda m: m.debit("u1", 0)),
    ("negative tokens", "tokens", lambda m: m.debit("u1", -5)),
    ("float tokens", "tokens", lambda m: m.debit("u1", 10.0)),
    ("string tokens", "tokens", lambda m: m.debit("u1", "10")),
    ("bool tokens", "tokens", lambda m: m.debit("u1", True)),
    ("tokens above 2^53", "tokens", lambda m: m.debit("u1", 2**53 + 1)),
    ("over the per-request maximum", "tokens", lambda m: m.debit("u1", 8_193)),
    ("reserve over the maximum", "tokens", lambda m: m.reserve("u1", 10_000)),
    ("empty account id", "account_id", lambda m: m.debit("", 1)),
    ("account id too long", "account_id", lambda m: m.debit("a" * 129, 1)),
    ("account id with a space", "account_id", lambda m: m.debit("u 1", 1)),
    ("account id with a brace", "account_id", lambda m: m.debit("u{1}", 1)),
    ("request id too long", "request_id", lambda m: m.debit("u1", 1, request_id="r" * 256)),
    ("request id with a newline", "request_id", lambda m: m.debit("u1", 1, request_id="a\nb")),
    ("agent label with a space", "agent", lambda m: m.debit("u1", 1, agent="no pe")),
    ("agent label too long", "agent", lambda m: m.debit("u1", 1, agent="a" * 65)),
    ("model label with a brace", "model", lambda m: m.debit("u1", 1, model="gpt{0}")),
    ("model label too long", "model", lambda m: m.debit("u1", 1, model="m" * 65)),
    ("negative input tokens", "input_tokens", lambda m: m.debit("u1", 1, input_tokens=-1)),
    ("unknown plan", "plan", lambda m: m.open_account("u9", plan="gold")),
    ("unknown bucket", "bucket", lambda m: m.credit("u1", 5, bucket="monthly")),
    ("unknown credit kind", "kind", lambda m: m.credit("u1", 5, kind="gift")),
    ("credit past 2^53", "tokens", lambda m: m.credit("u1", 2**53 - 1, bucket="premium")),
    ("bad hold id", "hold_id", lambda m: m.settle("u1", "h-1", 5)),
    ("negative actual", "actual_tokens", lambda m: m.settle("u1", "2", -1)),
    ("ttl too long", "ttl_ms", lambda m: m.reserve("u1", 5, ttl_ms=10**12)),
]


@pytest.mark.parametrize(("case", "field", "call"), BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
async def test_rejected_naming_the_field_and_nothing_changes(
    meter: Meter, case: str, field: str, call: Callable[[Meter], Awaitable[Any]]
) -> None:
    await meter.open_account("u1")
    await meter.credit("u1", 2**52, bucket="premium")
    await meter.debit("u1", 10, request_id="r-0")
    before = await redis_dump(meter)
    with pytest.raises(InvalidInput) as err:
        await call(meter)
    assert err.value.field == field, case
    assert await redis_dump(meter) == before
