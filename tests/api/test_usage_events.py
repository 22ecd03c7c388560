"""POST /api/v1/meter/usage: usage after the fact, each event charged exactly once, a result per
event, actual usage always recorded (uncollected, never negative)."""

from __future__ import annotations

import uuid
from typing import Any

from tests.api.conftest import Api

USAGE = "/api/v1/meter/usage"


async def _open(api: Api) -> str:
    account = f"us-{uuid.uuid4().hex[:8]}"
    r = await api.client.post("/api/v1/meter/accounts", json={"account_id": account}, headers=api.service())
    assert r.status_code == 201
    return account


async def _remaining(api: Api, account: str) -> int:
    r = await api.client.get(f"/api/v1/meter/accounts/{account}/balance", headers=api.service())
    return int(r.json()["remaining_tokens"])


def _event(account: str, key: str, usage: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"account_id": account, "idempotency_key": key, "model": "gpt-4o-mini-2024-07-18", "usage": usage,
            **extra}


async def test_a_batch_is_charged_once_with_a_result_per_event(api: Api) -> None:
    account = await _open(api)
    events = [
        _event(account, "e-openai", {"prompt_tokens": 300, "completion_tokens": 200,
                                     "prompt_tokens_details": {"cached_tokens": 100}}),
        _event(account, "e-anthropic", {"input_tokens": 100, "output_tokens": 50, "cache_read_input_tokens": 25,
                                        "cache_creation_input_tokens": 25}, model="claude-3-5-sonnet-20241022",
               agent="code", project_id="p-1"),
        _event(account, "e-responses", {"input_tokens": 40, "output_tokens": 10,
                                        "input_tokens_details": {"cached_tokens": 5}}),
    ]
    r = await api.client.post(USAGE, json={"events": events}, headers=api.service())
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["events"], body["charged"], body["failed"], body["charged_tokens"]) == (3, 3, 0, 500 + 200 + 50)
    assert [x["charged_tokens"] for x in body["results"]] == [500, 200, 50]
    assert body["results"][0]["usage"] == {"input_tokens": 300, "output_tokens": 200, "cached_tokens": 100}
    assert all(x["replayed"] is False for x in body["results"])
    assert await _remaining(api, account) == 10_000 - 750
    # the log shipper retries the whole batch: nothing is charged again
    again = (await api.client.post(USAGE, json={"events": events}, headers=api.service())).json()
    assert all(x["replayed"] is True for x in again["results"])
    assert [x["transaction_id"] for x in again["results"]] == [x["transaction_id"] for x in body["results"]]
    assert await _remaining(api, account) == 10_000 - 750
    # ... and the ledger holds one row per event
    await api.flush()
    from sqlalchemy import func, select

    from persistence.models import TokenTransaction

    async with api.state.rt.db.sessions() as session:
        rows = (await session.execute(select(func.count()).where(
            TokenTransaction.account_id == account, TokenTransaction.transaction_type == "usage"))).scalar_one()
    assert rows == 3


async def test_actual_usage_is_recorded_past_the_limits_never_negative(api: Api) -> None:
    account = await _open(api)
    await api.state.rt.meter.credit(account, 20_000, bucket="premium", kind="purchase")
    # above the per-request maximum (8,192): what was used is charged all the same
    r = await api.client.post(USAGE, json={"events": [_event(account, "big", {"prompt_tokens": 12_000,
                                                                              "completion_tokens": 3_000})]},
                              headers=api.service())
    assert r.json()["results"][0]["charged_tokens"] == 15_000
    # more than the balance: what is left is taken, the rest reported uncollected
    r = await api.client.post(USAGE, json={"events": [_event(account, "bigger", {"prompt_tokens": 16_000,
                                                                                 "completion_tokens": 0})]},
                              headers=api.service())
    result = r.json()["results"][0]
    assert (result["charged_tokens"], result["uncollected_tokens"], result["remaining_tokens"]) == (15_000, 1_000, 0)
    assert await _remaining(api, account) == 0


async def test_past_the_daily_cap_usage_is_still_recorded(api: Api) -> None:
    account = await _open(api)
    for _ in range(100):
        await api.client.post("/api/v1/meter/debit", json={"account_id": account, "tokens": 1}, headers=api.service())
    r = await api.client.post("/api/v1/meter/debit", json={"account_id": account, "tokens": 1}, headers=api.service())
    assert r.status_code == 429
    r = await api.client.post(USAGE, json={"events": [_event(account, "late", {"prompt_tokens": 10,
                                                                               "completion_tokens": 5})]},
                              headers=api.service())
    assert r.json()["results"][0]["charged_tokens"] == 15
    assert await _remaining(api, account) == 10_000 - 100 - 15


async def test_an_event_with_a_hold_settles_it(api: Api) -> None:
    account = await _open(api)
    r = await api.client.post("/api/v1/meter/reserve", json={"account_id": account, "tokens": 3_000},
                              headers=api.service())
    hold = r.json()["hold_id"]
    r = await api.client.post(USAGE, json={"events": [_event(account, "stream-1", {"prompt_tokens": 700,
                                                                                   "completion_tokens": 300},
                                                             hold_id=hold)]}, headers=api.service())
    assert r.json()["results"][0]["charged_tokens"] == 1_000
    assert await _remaining(api, account) == 9_000


async def test_a_bad_event_fails_alone(api: Api) -> None:
    account = await _open(api)
    events: list[Any] = [
        _event(account, "good", {"prompt_tokens": 10, "completion_tokens": 10}),
        _event(account, "no-usage-shape", {"tokens": 5}),
        _event(account, "negative", {"prompt_tokens": -1}),
        {"account_id": account, "usage": {"prompt_tokens": 1}},  # no idempotency key
        _event(account, "bad-model", {"prompt_tokens": 1}, model="gpt 4o"),
        _event("nobody-at-all", "unknown", {"prompt_tokens": 1}),
        _event(account, "no-hold", {"prompt_tokens": 1}, hold_id="987654"),
        "not an object",
    ]
    r = await api.client.post(USAGE, json={"events": events}, headers=api.service())
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["ok"] for x in results] == [True] + [False] * 7
    assert [x.get("field") for x in results[1:5]] == ["usage", "usage.prompt_tokens", "idempotency_key", "model"]
    assert [x["error"] for x in results[5:7]] == ["unknown_account", "unknown_hold"]
    assert results[7]["error"] == "invalid_input"
    assert await _remaining(api, account) == 10_000 - 20


async def test_the_envelope_is_checked(api: Api) -> None:
    account = await _open(api)
    too_many = [_event(account, f"k{i}", {"prompt_tokens": 1}) for i in range(1_001)]
    for body in ({"events": []}, {"events": too_many}, {"events": "x"}, {}):
        r = await api.client.post(USAGE, json=body, headers=api.service())
        assert r.status_code == 422 and r.json()["field"].startswith("events"), r.text
    assert (await api.client.post(USAGE, json={"events": []})).status_code == 401
    # a full batch of 1,000 fits the body cap and is charged
    full = [_event(account, f"f{i}", {"prompt_tokens": 1, "completion_tokens": 0}) for i in range(1_000)]
    r = await api.client.post(USAGE, json={"events": full}, headers=api.service())
    assert r.status_code == 200 and r.json()["charged"] == 1_000
    assert await _remaining(api, account) == 9_000
