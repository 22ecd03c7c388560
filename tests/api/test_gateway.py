"""The gateway endpoints (api/routes/gateway.py), driven as nginx auth_request, Traefik
forwardAuth and Envoy ext_authz drive them: headers in, headers out, any method, no body."""

from __future__ import annotations

import uuid

import pytest

from tests.api.conftest import MASTER_KEY, Api

CHECK = "/api/v1/gateway/check"


def gw(account: str | None, **headers: str) -> dict[str, str]:
    h = {"X-Tokenmeter-Key": MASTER_KEY, **{k.replace("_", "-"): v for k, v in headers.items()}}
    if account is not None:
        h["X-Tokenmeter-Account"] = account
    return h


async def _open(api: Api, plan: str = "free") -> str:
    account = f"gw-{uuid.uuid4().hex[:8]}"
    r = await api.client.post("/api/v1/meter/accounts", json={"account_id": account, "plan": plan},
                              headers=api.service())
    assert r.status_code == 201, r.text
    return account


async def _remaining(api: Api, account: str) -> int:
    r = await api.client.get(f"/api/v1/meter/accounts/{account}/balance", headers=api.service())
    return int(r.json()["remaining_tokens"])


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"])
async def test_check_answers_any_method_with_the_decision_in_headers(api: Api, method: str) -> None:
    account = await _open(api)
    r = await api.client.request(method, CHECK, headers=gw(account, X_Tokenmeter_Tokens="1500",
                                                           X_Tokenmeter_Model="gpt-4o-mini-2024-07-18",
                                                           X_Tokenmeter_Agent="chat-ui"))
    assert r.status_code == 200, r.text
    h = r.headers
    assert h["x-tokens-remaining"] == "8500" and h["x-requests-today"] == "1"
    assert h["x-tokenmeter-transaction"].startswith(f"{account}:")
    assert h["x-ratelimit-limit-requests"] == "100" and h["x-ratelimit-remaining-requests"] == "99"
    assert h["x-ratelimit-limit-tokens"] == "10000" and h["x-ratelimit-remaining-tokens"] == "8500"
    assert h["x-ratelimit-reset-requests"].endswith("s") and h["x-ratelimit-reset-tokens"].endswith("s")
    assert h["ratelimit-policy"].startswith('"daily";q=100;w=86400, "tokens";q=10000;w=')
    assert h["ratelimit"].startswith('"daily";r=99;t=') and '"tokens";r=8500;t=' in h["ratelimit"]
    assert await _remaining(api, account) == 8500


async def test_default_tokens_path_suffix_and_forwarded_headers(api: Api) -> None:
    account = await _open(api)
    # Envoy ext_authz appends the client's path to the check path; Traefik sends X-Forwarded-*
    r = await api.client.post(f"{CHECK}/v1/chat/completions", headers=gw(account))
    assert r.status_code == 200 and r.headers["x-tokens-remaining"] == "9000"  # the default: 1,000
    r = await api.client.get(CHECK, headers={**gw(account), "X-Forwarded-Method": "POST",
                                             "X-Forwarded-Uri": "/v1/messages", "X-Forwarded-Host": "llm.example"})
    assert r.status_code == 200 and r.headers["x-tokens-remaining"] == "8000"


async def test_who_is_charged(api: Api) -> None:
    user, auth = await api.register()
    other = await _open(api)
    # a user token alone charges its own account
    r = await api.client.get(CHECK, headers={**auth, "X-Tokenmeter-Tokens": "100"})
    assert r.status_code == 200 and r.headers["x-tokenmeter-transaction"].startswith(f"{user}:")
    # ... and no other
    r = await api.client.get(CHECK, headers={**auth, "X-Tokenmeter-Account": other})
    assert r.status_code == 403 and r.json()["field"] == "X-Tokenmeter-Account"
    # the gateway's key plus the user's token: the user's account
    r = await api.client.get(CHECK, headers={**auth, "X-Tokenmeter-Key": MASTER_KEY, "X-Tokenmeter-Tokens": "100"})
    assert r.status_code == 200 and r.headers["x-tokenmeter-transaction"].startswith(f"{user}:")
    # the service key as Authorization: Bearer, the account in the header
    r = await api.client.get(CHECK, headers={**api.service(), "X-Tokenmeter-Account": other})
    assert r.status_code == 200 and r.headers["x-tokenmeter-transaction"].startswith(f"{other}:")
    assert await _remaining(api, other) == 9000


@pytest.mark.parametrize("deny", [None, "403"])
async def test_unauthenticated_is_401_even_for_nginx(api: Api, deny: str | None) -> None:
    extra = {"X-Tokenmeter-Deny-Status": deny} if deny else {}
    for headers in ({}, {"X-Tokenmeter-Key": MASTER_KEY}, {"X-Tokenmeter-Key": "tmk_nope_nope"},
                    {"Authorization": "Bearer not-a-token", "X-Tokenmeter-Account": "a1"}):
        r = await api.client.get(CHECK, headers={**headers, **extra})
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"] == "unauthorized"


async def test_insufficient_is_402_or_403_with_the_numbers(api: Api) -> None:
    account = await _open(api)
    for _ in range(2):
        assert (await api.client.get(CHECK, headers=gw(account, X_Tokenmeter_Tokens="5000"))).status_code == 200
    r = await api.client.get(CHECK, headers=gw(account, X_Tokenmeter_Tokens="10"))
    assert r.status_code == 402
    body = r.json()
    assert body["error"] == "Insufficient tokens" and body["shortage"] == 10 and body["packages_url"]
    assert r.headers["x-tokenmeter-reason"] == "insufficient" and r.headers["x-ratelimit-remaining-tokens"] == "0"
    r = await api.client.get(CHECK, headers=gw(account, X_Tokenmeter_Tokens="10", X_Tokenmeter_Deny_Status="403"))
    assert r.status_code == 403
    h = r.headers
    assert (h["x-tokenmeter-reason"], h["x-tokenmeter-required"], h["x-tokenmeter-available"],
            h["x-tokenmeter-shortage"]) == ("insufficient", "10", "0", "10")
    assert "Need 10 more tokens" in h["x-tokenmeter-message"]


async def test_daily_cap_is_429_with_retry_after_or_403(api: Api) -> None:
    account = await _open(api)
    for _ in range(100):
        assert (await api.client.get(CHECK, headers=gw(account, X_Tokenmeter_Tokens="1"))).status_code == 200
    r = await api.client.get(CHECK, headers=gw(account, X_Tokenmeter_Tokens="1"))
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    assert r.headers["x-tokenmeter-reason"] == "daily_cap" and r.headers["x-ratelimit-remaining-requests"] == "0"
    r = await api.client.get(CHECK, headers=gw(account, X_Tokenmeter_Tokens="1", X_Tokenmeter_Deny_Status="403"))
    assert r.status_code == 403 and r.headers["x-tokenmeter-reason"] == "daily_cap"
    assert int(r.headers["retry-after"]) > 0


@pytest.mark.parametrize(("header", "value"), [
    ("X-Tokenmeter-Tokens", "abc"), ("X-Tokenmeter-Tokens", "0"), ("X-Tokenmeter-Tokens", "-5"),
    ("X-Tokenmeter-Tokens", "1.5"), ("X-Tokenmeter-Tokens", "9000"), ("X-Tokenmeter-Tokens", "9" * 20),
    ("X-Tokenmeter-Mode", "spend"), ("X-Tokenmeter-Model", "gpt 4o"), ("X-Tokenmeter-Agent", "a" * 65),
    ("X-Tokenmeter-Account", "a b"), ("Idempotency-Key", "x" * 256), ("X-Tokenmeter-Deny-Status", "500"),
    ("X-Tokenmeter-Hold-Ttl-Ms", "soon"),
])
async def test_a_bad_header_is_named_and_changes_nothing(api: Api, header: str, value: str) -> None:
    account = await _open(api)
    headers = {**gw(account, X_Tokenmeter_Mode="reserve" if header.endswith("Ttl-Ms") else "debit"), header: value}
    r = await api.client.get(CHECK, headers=headers)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == header
    if header != "X-Tokenmeter-Deny-Status":
        r = await api.client.get(CHECK, headers={**headers, "X-Tokenmeter-Deny-Status": "403"})
        assert r.status_code == 403 and r.headers["x-tokenmeter-reason"] == "invalid_request"
    assert await _remaining(api, account) == 10_000


async def test_unknown_account_is_404_or_403(api: Api) -> None:
    r = await api.client.get(CHECK, headers=gw("nobody-here"))
    assert r.status_code == 404 and r.json()["error"] == "unknown_account"
    r = await api.client.get(CHECK, headers=gw("nobody-here", X_Tokenmeter_Deny_Status="403"))
    assert r.status_code == 403 and r.headers["x-tokenmeter-reason"] == "unknown_account"


async def test_a_retried_key_is_charged_once(api: Api) -> None:
    account = await _open(api)
    for name in ("Idempotency-Key", "X-Request-Id"):
        key = f"{name}-{uuid.uuid4().hex}"
        first = await api.client.get(CHECK, headers={**gw(account, X_Tokenmeter_Tokens="700"), name: key})
        again = await api.client.post(CHECK, headers={**gw(account, X_Tokenmeter_Tokens="700"), name: key})
        assert first.status_code == again.status_code == 200
        assert first.headers["x-tokenmeter-transaction"] == again.headers["x-tokenmeter-transaction"]
        assert again.json()["replayed"] is True
    assert await _remaining(api, account) == 10_000 - 1_400


async def test_reserve_then_settle_from_headers_and_usage_bodies(api: Api) -> None:
    account = await _open(api)
    # settle with the actual tokens in a header
    r = await api.client.get(CHECK, headers=gw(account, X_Tokenmeter_Mode="reserve", X_Tokenmeter_Tokens="4000"))
    assert r.status_code == 200 and r.headers["x-tokens-remaining"] == "6000"
    hold = r.headers["x-tokenmeter-hold"]
    r = await api.client.post("/api/v1/gateway/settle", headers=gw(account, X_Tokenmeter_Hold=hold,
                                                                   X_Tokenmeter_Tokens="1200"))
    assert r.status_code == 200, r.text
    assert r.json()["charged_tokens"] == 1200 and r.headers["x-tokens-remaining"] == "8800"
    # settle in the path with an OpenAI response as the body (its model recorded)
    hold = (await api.client.get(CHECK, headers=gw(account, X_Tokenmeter_Mode="reserve",
                                                   X_Tokenmeter_Tokens="3000"))).headers["x-tokenmeter-hold"]
    completion = {"id": "chatcmpl-1", "model": "gpt-4o-2024-08-06", "choices": [],
                  "usage": {"prompt_tokens": 900, "completion_tokens": 300, "total_tokens": 1200,
                            "prompt_tokens_details": {"cached_tokens": 400}}}
    r = await api.client.post(f"/api/v1/gateway/settle/{hold}", json=completion, headers=gw(account))
    assert r.status_code == 200 and r.json()["charged_tokens"] == 1200
    # an Anthropic usage object: input + cache writes + cache reads + output
    hold = (await api.client.get(CHECK, headers=gw(account, X_Tokenmeter_Mode="reserve",
                                                   X_Tokenmeter_Tokens="3000"))).headers["x-tokenmeter-hold"]
    usage = {"input_tokens": 100, "cache_creation_input_tokens": 50, "cache_read_input_tokens": 25,
             "output_tokens": 200}
    r = await api.client.post(f"/api/v1/gateway/settle/{hold}", json=usage,
                              headers=gw(account, X_Tokenmeter_Model="claude-3-5-sonnet-20241022"))
    assert r.status_code == 200 and r.json()["charged_tokens"] == 375
    # release from the path gives everything back
    hold = (await api.client.get(CHECK, headers=gw(account, X_Tokenmeter_Mode="reserve",
                                                   X_Tokenmeter_Tokens="2000"))).headers["x-tokenmeter-hold"]
    r = await api.client.post(f"/api/v1/gateway/release/{hold}", headers=gw(account))
    assert r.status_code == 200 and r.json()["released_tokens"] == 2000
    assert await _remaining(api, account) == 10_000 - 1200 - 1200 - 375


async def test_one_idempotency_key_serves_a_calls_reserve_settle_and_their_retries(api: Api) -> None:
    account = await _open(api)
    key = f"call-{uuid.uuid4().hex[:8]}"
    reserve = gw(account, X_Tokenmeter_Mode="reserve", X_Tokenmeter_Tokens="3000", Idempotency_Key=key)
    first = await api.client.get(CHECK, headers=reserve)
    assert first.status_code == 200, first.text
    hold = first.headers["x-tokenmeter-hold"]
    settle = gw(account, X_Tokenmeter_Hold=hold, X_Tokenmeter_Tokens="1000", Idempotency_Key=key)
    s1 = await api.client.post("/api/v1/gateway/settle", headers=settle)
    assert s1.status_code == 200 and s1.json()["replayed"] is False, s1.text
    # nginx retries both halves: each is answered from its own record, charged once
    again = await api.client.get(CHECK, headers=reserve)
    assert again.status_code == 200 and again.headers["x-tokenmeter-hold"] == hold
    s2 = await api.client.post("/api/v1/gateway/settle", headers=settle)
    assert s2.status_code == 200 and s2.json()["replayed"] is True
    assert s2.json()["transaction_id"] == s1.json()["transaction_id"]
    # the same key with another amount is still a conflict, naming the caller's key
    s3 = await api.client.post("/api/v1/gateway/settle", headers={**settle, "X-Tokenmeter-Tokens": "999"})
    assert s3.status_code == 409 and s3.json()["idempotency_key"] == key
    assert await _remaining(api, account) == 9_000


async def test_settle_refuses_what_it_cannot_read(api: Api) -> None:
    account = await _open(api)
    hold = (await api.client.get(CHECK, headers=gw(account, X_Tokenmeter_Mode="reserve",
                                                   X_Tokenmeter_Tokens="1000"))).headers["x-tokenmeter-hold"]
    cases = [({}, None, "X-Tokenmeter-Tokens"), ({"X-Tokenmeter-Tokens": "x"}, None, "X-Tokenmeter-Tokens"),
             ({}, b"{not json", "body"), ({}, b'{"foo": 1}', "usage"),
             ({}, b'{"prompt_tokens": -1}', "usage.prompt_tokens"),
             ({}, b'{"usage": {"input_tokens": 1.5}}', "usage.input_tokens")]
    for extra, body, field in cases:
        r = await api.client.post(f"/api/v1/gateway/settle/{hold}", content=body, headers={**gw(account), **extra})
        assert r.status_code == 422 and r.json()["field"] == field, (extra, body, r.text)
    r = await api.client.post("/api/v1/gateway/settle", headers=gw(account, X_Tokenmeter_Tokens="5"))
    assert r.status_code == 422 and r.json()["field"] == "X-Tokenmeter-Hold"
    r = await api.client.post("/api/v1/gateway/settle/999999", headers=gw(account, X_Tokenmeter_Tokens="5"))
    assert r.status_code == 404 and r.json()["error"] == "unknown_hold"
    assert await _remaining(api, account) == 9_000  # only the hold


async def test_unpriced_models_are_recorded_and_flagged(api: Api) -> None:
    _user, auth = await api.register()
    for model in ("my-finetune-v3", "gpt-4o"):
        r = await api.client.get(CHECK, headers={**auth, "X-Tokenmeter-Tokens": "1000", "X-Tokenmeter-Model": model})
        assert r.status_code == 200
    await api.flush()
    r = await api.client.get("/api/v1/tokens/analytics", headers=auth)
    body = r.json()
    assert body["model_usage_breakdown"] == {"my-finetune-v3": 1000, "gpt-4o": 1000}
    assert body["unpriced"] == {"requests": 1, "tokens": 1000, "models": ["my-finetune-v3"]}
    assert body["estimated_cost"]["usd_micros"] == 10_000  # 1,000 gpt-4o tokens priced as output: $10/M
