"""POST /api/v1/meter/usage as a log shipper and a streaming proxy use it: batches of provider
usage objects, resent after a timeout, with bad events mixed in, past the plan's limits."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from meter import StoreUnavailable
from tests.api.conftest import Api, make_settings, running_app
from tests.api.test_seed_flow import wait_for_transactions
from tests.conftest import DATABASES

pytestmark = pytest.mark.redis

USAGE = "/api/v1/meter/usage"


@pytest.fixture(params=DATABASES)
async def app(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Api]:
    overrides: dict[str, Any] = {}
    if request.param == "postgres":
        overrides["database_url"] = request.getfixturevalue("pg_database")
    async with running_app(make_settings(tmp_path, **overrides)) as a:
        yield a


async def _balance(api: Api, account: str) -> dict[str, Any]:
    r = await api.client.get(f"/api/v1/meter/accounts/{account}/balance", headers=api.service())
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def _post(api: Api, events: list[Any]) -> tuple[int, dict[str, Any]]:
    r = await api.client.post(USAGE, json={"events": events}, headers=api.service())
    return r.status_code, r.json()


def _key() -> str:
    return f"evt-{uuid.uuid4().hex[:12]}"


async def test_a_batch_of_openai_anthropic_and_plain_events_is_charged_then_replayed(app: Api) -> None:
    user, auth = await app.register()
    hold = (await app.client.post("/api/v1/meter/reserve", json={"account_id": user, "tokens": 2_000},
                                  headers={**app.service(), "Idempotency-Key": "call-7"})).json()
    events = [
        {"account_id": user, "idempotency_key": _key(), "model": "gpt-4o-mini-2024-07-18",
         "usage": {"prompt_tokens": 1_200, "completion_tokens": 300,
                   "prompt_tokens_details": {"cached_tokens": 1_000}}},
        {"account_id": user, "idempotency_key": _key(), "model": "claude-3-5-sonnet-20241022", "agent": "code",
         "usage": {"input_tokens": 100, "output_tokens": 400, "cache_read_input_tokens": 500}},
        {"account_id": user, "idempotency_key": _key(), "tokens": 250, "model": "my-finetune", "project_id": "p9"},
        # the streamed call reserved above, settled from its usage with the reserve's own key
        {"account_id": user, "idempotency_key": "call-7", "hold_id": hold["hold_id"], "model": "gpt-4o",
         "usage": {"prompt_tokens": 900, "completion_tokens": 600}},
    ]
    status, body = await _post(app, events)
    assert status == 200, body
    assert (body["recorded"], body["failed"], body["uncollected_tokens"]) == (4, 0, 0)
    res = body["results"]
    assert [r["index"] for r in res] == [0, 1, 2, 3] and all(r["ok"] and not r["replayed"] for r in res)
    assert [r["charged_tokens"] for r in res] == [1_500, 1_000, 250, 1_500] and body["charged_tokens"] == 4_250
    assert [r["priced"] for r in res] == [True, True, False, True]
    assert res[0]["cost_usd_micros"] > 0 and res[2]["cost_usd_micros"] == 0
    bal = await _balance(app, user)
    assert (bal["remaining_tokens"], bal["reserved_tokens"]) == (10_000 - 4_250, 0)

    again_status, again = await _post(app, events)  # the shipper timed out and sent it all again
    assert again_status == 200 and all(r["replayed"] for r in again["results"]) and again["charged_tokens"] == 0
    assert [r["transaction_id"] for r in again["results"]] == [r["transaction_id"] for r in res]
    assert (await _balance(app, user))["remaining_tokens"] == 10_000 - 4_250

    items = await wait_for_transactions(app, auth, 1 + 3 + 2)  # welcome, 3 usage, hold + settle
    usage = sorted((i["tokens"], i["model"]) for i in items if i["type"] == "usage")  # the settle shows as usage
    assert usage == [(-1_500, "gpt-4o"), (-1_500, "gpt-4o-mini-2024-07-18"), (-1_000, "claude-3-5-sonnet-20241022"),
                     (-250, "my-finetune")]
    stats = (await app.client.get("/api/v1/tokens/analytics", headers=auth)).json()
    assert stats["total_tokens_used"] == 4_250
    assert stats["unpriced"]["models"] == ["my-finetune"] and stats["unpriced"]["tokens"] == 250


async def test_usage_past_the_limits_is_recorded_and_the_shortfall_uncollected(app: Api) -> None:
    user, _ = await app.register()  # free: 10,000 tokens, 8,192 per request at most
    status, body = await _post(app, [{"account_id": user, "idempotency_key": _key(), "tokens": 20_000}])
    assert status == 200
    (r,) = body["results"]
    assert (r["charged_tokens"], r["uncollected_tokens"], r["remaining_tokens"]) == (10_000, 10_000, 0)
    # a debit asking for that much is refused before anything changes: the maximum bounds asks
    d = await app.client.post("/api/v1/meter/debit", json={"account_id": user, "tokens": 20_000},
                              headers=app.service())
    assert d.status_code == 422 and d.json()["field"] == "tokens"
    bal = await _balance(app, user)
    assert (bal["remaining_tokens"], bal["used_tokens"], bal["requests_today"]) == (0, 10_000, 1)


async def test_bad_events_get_their_own_errors_and_the_rest_are_charged(app: Api) -> None:
    user, _ = await app.register()
    good = {"account_id": user, "idempotency_key": _key(), "tokens": 100}
    events: list[Any] = [
        good,
        42,
        {"account_id": user, "tokens": 5},  # no idempotency key
        {"account_id": user, "idempotency_key": _key()},  # neither usage nor tokens
        {"account_id": user, "idempotency_key": _key(), "tokens": 5, "usage": {"prompt_tokens": 5}},
        {"account_id": user, "idempotency_key": _key(), "usage": {"prompt_tokens": -3}},
        {"account_id": user, "idempotency_key": _key(), "usage": {"total": 3}},
        {"account_id": "nobody-" + uuid.uuid4().hex[:6], "idempotency_key": _key(), "tokens": 5},
        {"account_id": user, "idempotency_key": _key(), "tokens": 5, "model": "no spaces allowed"},
        {"account_id": user, "idempotency_key": _key(), "tokens": 5, "hold_id": "999999"},
        {"account_id": user, "idempotency_key": good["idempotency_key"], "tokens": 101},  # reused key
    ]
    status, body = await _post(app, events)
    assert status == 200 and (body["recorded"], body["failed"]) == (1, 10)
    res = body["results"]
    errors = [(r["status"], r["error"], r.get("field")) for r in res[1:]]
    assert errors[:7] == [
        (422, "invalid_input", "events.1"),
        (422, "invalid_input", "events.2.idempotency_key"),
        (422, "invalid_input", "events.3.usage"),
        (422, "invalid_input", "events.4.usage"),
        (422, "invalid_input", "events.5.usage.prompt_tokens"),
        (422, "invalid_input", "events.6.usage"),
        (404, "unknown_account", None),
    ]
    assert errors[7][:2] == (422, "invalid_input") and errors[7][2].startswith("events.8.")
    assert errors[8][:2] == (404, "unknown_hold")
    assert errors[9][:2] == (409, "idempotency_conflict")  # events run in order of the batch: the first won
    bal = await _balance(app, user)
    assert (bal["remaining_tokens"], bal["requests_today"]) == (9_900, 1)


@pytest.mark.parametrize("body", [b"", b"not json", b"[]", b'{"events": []}', b'{"events": {}}',
                                  json.dumps({"events": [{}] * 1_001}).encode()])
async def test_a_malformed_batch_is_refused_whole_and_changes_nothing(app: Api, body: bytes) -> None:
    r = await app.client.post(USAGE, content=body, headers={**app.service(), "Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"] == "invalid_input", r.text


async def test_the_batch_endpoint_needs_the_meter_key_and_bounds_its_body(app: Api) -> None:
    user, auth = await app.register()
    event = {"events": [{"account_id": user, "idempotency_key": _key(), "tokens": 10}]}
    assert (await app.client.post(USAGE, json=event)).status_code == 401
    assert (await app.client.post(USAGE, json=event, headers=auth)).status_code == 401  # a user is not a gateway
    big = b'{"events": [' + b" " * 2_100_000 + b"]}"
    r = await app.client.post(USAGE, content=big, headers={**app.service(), "Content-Type": "application/json"})
    assert r.status_code == 413
    assert (await _balance(app, user))["remaining_tokens"] == 10_000


async def test_a_thousand_events_with_duplicates_are_each_charged_once(app: Api) -> None:
    accounts = [(await app.register())[0] for _ in range(2)]
    keys = [_key() for _ in range(500)]
    events = [{"account_id": accounts[i % 2], "idempotency_key": keys[i // 2], "tokens": 3} for i in range(1_000)]
    events[999] = events[997]  # the same event twice in one batch, run concurrently
    status, body = await _post(app, events)
    assert status == 200 and body["failed"] == 0
    assert sum(1 for r in body["results"] if r["replayed"]) == 1
    used = [(await _balance(app, a))["used_tokens"] for a in accounts]
    assert used == [500 * 3, 499 * 3] and body["charged_tokens"] == 999 * 3
    again_status, again = await _post(app, events)
    assert again_status == 200 and all(r["replayed"] for r in again["results"])
    assert [(await _balance(app, a))["used_tokens"] for a in accounts] == used


async def test_events_that_cannot_reach_redis_make_the_batch_a_503_to_resend(app: Api,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    ok_user, down_user = (await app.register())[0], (await app.register())[0]
    store = app.state.rt.meter.store
    real_call = store.call

    async def flaky(op: str, keys: Any, argv: Any) -> Any:
        if argv[0] == down_user:
            raise StoreUnavailable("connection refused")
        return await real_call(op, keys, argv)

    monkeypatch.setattr(store, "call", flaky)
    events = [{"account_id": ok_user, "idempotency_key": "k-ok", "tokens": 40},
              {"account_id": down_user, "idempotency_key": "k-down", "tokens": 40}]
    status, body = await _post(app, events)
    assert status == 503 and [r["ok"] for r in body["results"]] == [True, False]
    assert body["results"][1]["error"] == "store_unavailable"
    monkeypatch.setattr(store, "call", real_call)
    status, body = await _post(app, events)  # resent whole: the first replays, the second lands
    assert status == 200 and [r["replayed"] for r in body["results"]] == [True, False]
    assert [(await _balance(app, a))["used_tokens"] for a in (ok_user, down_user)] == [40, 40]


async def test_the_idempotency_retention_setting_reaches_the_service(tmp_path: Any) -> None:
    from meter import keys as keyspace

    async with running_app(make_settings(tmp_path, idempotency_ttl_s=120)) as api:
        user, _ = await api.register()
        status, _ = await _post(api, [{"account_id": user, "idempotency_key": "k-ttl", "tokens": 5}])
        assert status == 200
        s = api.settings
        key = keyspace.idempotency_key(user, "k-ttl", shards=s.shards, prefix=s.key_prefix)
        assert 100 <= await api.state.rt.redis.ttl(key) <= 120
        assert api.state.rt.meter.loader.idempotency_ttl_s == 120
