"""Concurrency: balances never go negative, caps are never passed, retries charge once."""

from __future__ import annotations

import asyncio

import pytest

from meter import Meter
from tests.conftest import MeterFactory, journal_of
from tests.meter.test_wallet import catalog_with, conservation

pytestmark = [pytest.mark.redis, pytest.mark.slow]

CLIENT_POOLS = 4  # separate Meters (connection pools) so calls really interleave in Redis


async def _meters(make_meter: MeterFactory, backend: str, **options: object) -> list[Meter]:
    """Meters sharing one key prefix; on real Redis each has its own connection pool."""
    first = await make_meter(backend, **options)
    if backend != "redis":
        return [first]
    others = [await make_meter(backend, **options) for _ in range(CLIENT_POOLS - 1)]
    return [first, *(Meter(m.store, prefix=first.prefix, **options) for m in others)]  # type: ignore[arg-type]


async def _hammer(meters: list[Meter], n_clients: int, n_calls: int, call: object) -> list[object]:
    queue = list(range(n_calls))
    results: list[object] = []

    async def client(i: int) -> None:
        m = meters[i % len(meters)]
        while queue:
            k = queue.pop()
            results.append(await call(m, k))  # type: ignore[operator]

    await asyncio.gather(*(client(i) for i in range(n_clients)))
    return results


async def test_200_clients_10000_debits_against_5000_tokens(make_meter: MeterFactory, lua_backend: str,
                                                             clock: object) -> None:
    catalog = catalog_with(monthly_tokens=5_000, daily_requests=0)
    meters = await _meters(make_meter, lua_backend, catalog=catalog, clock=clock)
    await meters[0].open_account("hot", plan="t")
    results = await _hammer(meters, 200, 10_000, lambda m, k: m.debit("hot", 1))
    allowed = sum(1 for d in results if d.allowed)  # type: ignore[attr-defined]
    assert allowed == 5_000
    assert {d.reason for d in results if not d.allowed} == {"insufficient"}  # type: ignore[attr-defined]
    assert (await meters[0].balance("hot")).remaining_tokens == 0
    usage = [e for e in await journal_of(meters[0], "hot") if e.kind == "usage"]
    assert len(usage) == 5_000
    await conservation(meters[0], "hot")


async def test_daily_cap_is_exact_under_concurrency(make_meter: MeterFactory, lua_backend: str,
                                                    clock: object) -> None:
    catalog = catalog_with(monthly_tokens=100_000, daily_requests=100)
    meters = await _meters(make_meter, lua_backend, catalog=catalog, clock=clock)
    await meters[0].open_account("hot", plan="t")
    results = await _hammer(meters, 200, 1_000, lambda m, k: m.debit("hot", 3))
    assert sum(1 for d in results if d.allowed) == 100  # type: ignore[attr-defined]
    assert {d.reason for d in results if not d.allowed} == {"daily_cap"}  # type: ignore[attr-defined]
    bal = await meters[0].balance("hot")
    assert (bal.requests_today, bal.used_tokens) == (100, 300)


async def test_each_request_sent_three_times_concurrently_is_charged_once(
    make_meter: MeterFactory, lua_backend: str, clock: object
) -> None:
    catalog = catalog_with(monthly_tokens=1_000_000, daily_requests=0)
    meters = await _meters(make_meter, lua_backend, catalog=catalog, clock=clock)
    await meters[0].open_account("hot", plan="t")

    async def three(k: int) -> list[object]:
        calls = [meters[(k + j) % len(meters)].debit("hot", 1 + k % 7, request_id=f"req-{k}")
                 for j in range(3)]
        return list(await asyncio.gather(*calls))

    answers = []
    for start in range(0, 1_000, 100):
        answers += await asyncio.gather(*(three(k) for k in range(start, start + 100)))
    expected_total = 0
    for k, trio in enumerate(answers):
        assert sum(1 for d in trio if not d.replayed) == 1  # type: ignore[attr-defined]
        shapes = {(d.allowed, d.transaction_id, d.tokens, d.remaining) for d in trio}  # type: ignore[attr-defined]
        assert len(shapes) == 1
        expected_total += 1 + k % 7
    bal = await meters[0].balance("hot")
    assert bal.used_tokens == expected_total and bal.total_requests == 1_000
    assert len([e for e in await journal_of(meters[0], "hot") if e.kind == "usage"]) == 1_000
    before = await meters[0].balance("hot")
    with pytest.raises(Exception, match="already used"):
        await meters[0].debit("hot", 100, request_id="req-5")
    assert await meters[0].balance("hot") == before
