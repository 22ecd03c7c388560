"""Two accounts never share an idempotency record, though account ids and request ids may both
contain ':' (account `col` + request `y28:req-1` against account `col:y28` + request `req-1`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from meter import Meter
from meter import keys as keyspace
from tests.api.conftest import Api, make_settings, running_app
from tests.conftest import MeterFactory


@pytest.fixture
async def http_api(tmp_path: Any) -> AsyncIterator[Api]:
    async with running_app(make_settings(tmp_path)) as a:
        yield a


def colliding_pair(shards: int = keyspace.DEFAULT_SHARDS) -> tuple[str, str, str, str]:
    """(account a, request of a, account b, request of b) whose plain `idem:<account>:<request>`
    spellings are equal and whose accounts live on one shard (so the old keys were one key)."""
    for i in range(10_000):
        middle = f"y{i}"
        a, b = "col", f"col:{middle}"
        if keyspace.shard_of(a, shards) == keyspace.shard_of(b, shards):
            return a, f"{middle}:req-1", b, "req-1"
    raise AssertionError("no pair on one shard")


@pytest.mark.unit
def test_the_keys_of_a_colliding_pair_differ() -> None:
    a, ra, b, rb = colliding_pair()
    assert f"{a}:{ra}" == f"{b}:{rb}"  # the ambiguity the old layout had
    assert keyspace.idempotency_key(a, ra) != keyspace.idempotency_key(b, rb)


@pytest.mark.unit
@pytest.mark.parametrize(("account", "request_id"), [("u1", "r"), ("a:b", "c:d"), ("z" * 128, ":" * 255)])
def test_the_key_decodes_back_to_account_and_request(account: str, request_id: str) -> None:
    key = keyspace.idempotency_key(account, request_id, shards=16, prefix="px")
    tag = keyspace.shard_tag(keyspace.shard_of(account, 16), "px")
    rest = key.removeprefix(f"{tag}:idem2:")
    length, _, tail = rest.partition(":")
    assert (tail[:int(length)], tail[int(length) + 1:]) == (account, request_id)
    assert keyspace.account_keys(account, request_id, shards=16, prefix="px").idempotency == key


@pytest.mark.unit
def test_the_meter_builds_the_public_key() -> None:
    """The hot path appends the request id to a cached prefix: it must spell idempotency_key()."""
    from meter import ReferenceStore

    m = Meter(ReferenceStore(), shards=8, prefix="pq")
    for account, rid in [("col", "y28:req-1"), ("col:y28", "req-1"), ("u", "x")]:
        assert m._keys(account, rid)[5] == keyspace.idempotency_key(account, rid, shards=8, prefix="pq")


@pytest.mark.redis
async def test_the_second_account_is_charged_not_replayed(backend: str, make_meter: MeterFactory) -> None:
    meter = await make_meter(backend)
    a, ra, b, rb = colliding_pair(meter.shards)
    for account in (a, b):
        await meter.open_account(account)
        await meter.credit(account, 1_000, bucket="premium")
    start_b = (await meter.balance(b)).remaining_tokens
    first = await meter.debit(a, 10, request_id=ra)
    second = await meter.debit(b, 10, request_id=rb)
    assert first.allowed and not first.replayed
    assert second.allowed and not second.replayed
    assert second.remaining == start_b - 10 == (await meter.balance(b)).remaining_tokens
    again = await meter.debit(b, 10, request_id=rb)  # a real retry of b is still replayed
    assert again.replayed and again.transaction_id == second.transaction_id


@pytest.mark.redis
async def test_over_http_the_second_account_is_charged(http_api: Api) -> None:
    api = http_api
    a, ra, b, rb = colliding_pair(api.settings.shards)
    h = api.service()
    for account in (a, b):
        r = await api.client.post("/api/v1/meter/accounts", json={"account_id": account}, headers=h)
        assert r.status_code in (200, 201), r.text
    before = (await api.client.get(f"/api/v1/meter/accounts/{b}/balance", headers=h)).json()["remaining_tokens"]
    r1 = await api.client.post("/api/v1/meter/debit", json={"account_id": a, "tokens": 10},
                               headers={**h, "Idempotency-Key": ra})
    r2 = await api.client.post("/api/v1/meter/debit", json={"account_id": b, "tokens": 10},
                               headers={**h, "Idempotency-Key": rb})
    assert r1.status_code == r2.status_code == 200, (r1.text, r2.text)
    assert r2.json()["replayed"] is False
    assert r2.json()["remaining_tokens"] == before - 10
