"""The metering proxy end to end: a real `tokenmeter serve` in front of a fake upstream process,
driven over HTTP as an SDK would. The books are checked on every path: what the upstream reported
is what was charged, an upstream failure charges nothing, every hold is closed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Any

import httpx

from loadtests.fake_llm import UPSTREAM_KEY, usage_for
from tests.proxy.conftest import SVC, Stack, balance, new_account, stats

CHAT = "/llm/openai/v1/chat/completions"
MESSAGES = "/llm/anthropic/v1/messages"


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


def anthropic(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "claude-3-5-haiku-20241022", "max_tokens": 256,
            "messages": [{"role": "user", "content": text}], **extra}


def billed(body: dict[str, Any]) -> int:
    """What the fake upstream reports for this request (input + output tokens)."""
    inp, out, _ = usage_for(body)
    return inp + out


async def settled(tm: httpx.AsyncClient, account: str, before: int, timeout_s: float = 10.0) -> dict[str, int]:
    """The balance once no hold is open (a stream's hold closes just after its last byte)."""
    deadline = time.monotonic() + timeout_s
    while True:
        b = await balance(tm, account)
        if b["reserved"] == 0 or time.monotonic() > deadline:
            return {**b, "charged": before - b["remaining"]}
        await asyncio.sleep(0.05)


async def read_stream(response: httpx.Response) -> tuple[list[dict[str, Any]], float]:
    """The JSON events of an SSE response, and when its first byte came (perf_counter)."""
    events, first, buf = [], 0.0, b""
    async for chunk in response.aiter_raw():
        first = first or time.perf_counter()
        buf += chunk
    for line in buf.split(b"\n"):
        if line.startswith(b"data:") and line[5:].strip() not in (b"", b"[DONE]"):
            events.append(json.loads(line[5:]))
    return events, first


async def test_a_whole_chat_completion_is_charged_its_reported_usage(stack: Stack, tm: httpx.AsyncClient) -> None:
    user, auth = await new_account(tm)
    body = chat("hello there words:12")
    r = await tm.post(CHAT, json=body, headers={**auth, "X-Tokenmeter-Agent": "code", "X-Tokenmeter-Project": "p1"})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == billed(body)
    b = await settled(tm, user, 10_000)
    assert b["charged"] == billed(body) and b["reserved"] == 0
    # the meter's headers on the upstream's answer, the balance after the charge
    assert int(r.headers["x-tokens-remaining"]) == b["remaining"]
    assert int(r.headers["x-tokenmeter-charged"]) == billed(body)
    assert r.headers["x-ratelimit-remaining-requests"] == "99" and "ratelimit-policy" in r.headers
    assert r.headers["x-request-id"] == "req_fake"  # the upstream's own headers pass
    assert r.headers["x-ratelimit-limit-tokens"] != "1"  # ... but its rate-limit figures are ours
    # the upstream saw our credentials, never the caller's
    seen = (await stats(stack))["last_headers"]
    assert isinstance(seen, dict)
    assert seen["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert not any(k.startswith("x-tokenmeter") for k in seen)


async def test_history_shows_the_proxied_call_with_model_and_tokens(tm: httpx.AsyncClient) -> None:
    _user, auth = await new_account(tm)
    body = chat("history please")
    r = await tm.post(CHAT, json=body, headers={**auth, "X-Tokenmeter-Agent": "code"})
    assert r.status_code == 200
    inp, out, _ = usage_for(body)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        rows = (await tm.get("/api/v1/tokens/transactions", headers=auth)).json()
        usage_rows = [t for t in rows if t["type"] == "usage"]
        if usage_rows:
            break
        await asyncio.sleep(0.1)
    assert len(usage_rows) == 1, rows
    row = usage_rows[0]
    assert (row["tokens"], row["model"], row["agent"]) == (-(inp + out), "gpt-4o-mini", "code")
    assert (row["input_tokens"], row["output_tokens"]) == (inp, out)
    assert row["estimated_cost_usd_micros"] > 0  # priced from the catalog
    analytics = (await tm.get("/api/v1/tokens/analytics", headers=auth)).json()
    assert "gpt-4o-mini" in json.dumps(analytics)


async def test_a_streamed_chat_passes_chunk_by_chunk_and_is_charged_the_final_usage(tm: httpx.AsyncClient) -> None:
    user, auth = await new_account(tm)
    body = chat("stream me words:20", stream=True)
    async with tm.stream("POST", CHAT, json=body, headers=auth) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert "x-tokens-remaining" in r.headers and r.headers["x-tokenmeter-hold"]
        events, _ = await read_stream(r)
    text = "".join(e["choices"][0]["delta"]["content"] for e in events if e.get("choices"))
    assert text.count("w") == 20
    usage = [e["usage"] for e in events if e.get("usage")]  # asked for by the proxy (include_usage)
    assert len(usage) == 1 and usage[0]["total_tokens"] == billed({**body, "stream_options": {}})
    b = await settled(tm, user, 10_000)
    assert b["charged"] == usage[0]["total_tokens"] and b["reserved"] == 0


async def test_a_slow_stream_is_not_buffered(tm: httpx.AsyncClient) -> None:
    """Each chunk reaches the client as the upstream sends it: 0.2 s apart, not all at the end."""
    user, auth = await new_account(tm)
    arrivals = []
    async with tm.stream("POST", CHAT, json=chat("slow words:5", stream=True), headers=auth) as r:
        async for chunk in r.aiter_raw():
            if b"delta" in chunk:
                arrivals.append(time.perf_counter())
    assert len(arrivals) >= 4
    assert arrivals[-1] - arrivals[0] > 0.5  # spread over the stream: passed through as they came
    await settled(tm, user, 10_000)


async def test_anthropic_messages_whole_and_streamed(stack: Stack, tm: httpx.AsyncClient) -> None:
    user, auth = await new_account(tm)
    body = anthropic("bonjour words:9")
    r = await tm.post(MESSAGES, json=body, headers=auth)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["output_tokens"] == 9
    b = await settled(tm, user, 10_000)
    assert b["charged"] == billed(body)
    seen = (await stats(stack))["last_headers"]
    assert isinstance(seen, dict)
    assert seen["x-api-key"] == UPSTREAM_KEY and seen["anthropic-version"] == "2023-06-01"
    before = b["remaining"]
    sbody = anthropic("streamed words:15", stream=True)
    async with tm.stream("POST", MESSAGES, json=sbody, headers=auth) as r:
        assert r.status_code == 200
        events, _ = await read_stream(r)
    assert [e["type"] for e in events][:2] == ["message_start", "content_block_start"]
    b = await settled(tm, user, before)
    assert b["charged"] == billed(sbody) and b["reserved"] == 0


async def test_responses_embeddings_and_completions(tm: httpx.AsyncClient) -> None:
    user, auth = await new_account(tm)
    left = 10_000
    cases = [("/llm/openai/v1/responses", {"model": "gpt-4o", "input": "respond words:4"}),
             ("/llm/openai/v1/responses", {"model": "gpt-4o", "input": "respond words:6", "stream": True}),
             ("/llm/openai/v1/embeddings", {"model": "text-embedding-3-small", "input": "embed me"}),
             ("/llm/openai/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "complete words:3"}),
             ("/llm/openai/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "complete words:5",
                                             "stream": True})]
    for path, body in cases:
        async with tm.stream("POST", path, json=body, headers=auth) as r:
            assert r.status_code == 200, (path, await r.aread())
            await r.aread()
        b = await settled(tm, user, left)
        expected = usage_for(body)[0] if "embeddings" in path else billed(body)
        assert b["charged"] == expected, (path, body)
        left = b["remaining"]


async def test_an_upstream_error_is_passed_on_and_nothing_is_charged(stack: Stack, tm: httpx.AsyncClient) -> None:
    user, auth = await new_account(tm)
    for path, body in ((CHAT, chat("fail:500")), (CHAT, chat("fail:429", stream=True)),
                       (MESSAGES, anthropic("fail:529")), (MESSAGES, anthropic("fail:400", stream=True))):
        r = await tm.post(path, json=body, headers=auth)
        status = int(body["messages"][0]["content"].split(":")[1])
        assert r.status_code == status, r.text
        assert "upstream says no" in r.text  # the upstream's own body, for the SDK to raise on
        assert await balance(tm, user) == {"remaining": 10_000, "reserved": 0}


async def test_a_stream_cut_before_any_output_is_released_after_output_is_charged(tm: httpx.AsyncClient) -> None:
    user, auth = await new_account(tm)
    async with tm.stream("POST", CHAT, json=chat("breakfirst", stream=True), headers=auth) as r:
        assert r.status_code == 200
        with contextlib.suppress(httpx.HTTPError):
            await r.aread()
    b = await settled(tm, user, 10_000)
    assert b["charged"] == 0 and b["reserved"] == 0
    # cut after 3 words: the upstream reported nothing; the prompt and what was streamed are charged
    body = chat("break words:10", stream=True)
    async with tm.stream("POST", CHAT, json=body, headers=auth) as r:
        with contextlib.suppress(httpx.HTTPError):
            await r.aread()
    b = await settled(tm, user, 10_000)
    assert b["reserved"] == 0
    assert 0 < b["charged"] < billed(body) + 50


async def test_a_client_that_disconnects_mid_stream_is_charged_what_was_streamed(tm: httpx.AsyncClient) -> None:
    user, auth = await new_account(tm)
    body = anthropic("slow words:40", stream=True)
    async with httpx.AsyncClient(base_url=str(tm.base_url), timeout=10) as client, \
            client.stream("POST", MESSAGES, json=body, headers=auth) as r:
        assert r.status_code == 200
        got = b""
        async for chunk in r.aiter_raw():
            got += chunk
            if got.count(b"content_block_delta") >= 4:
                break  # leave: the connection is closed under the proxy
    b = await settled(tm, user, 10_000)
    assert b["reserved"] == 0, "the hold of a disconnected stream was closed"
    inp = usage_for(body)[0]
    assert inp + 1 <= b["charged"] < billed(body)  # the reported input, and at least one output token


async def test_refusals_come_in_the_vendors_error_shape_and_never_reach_the_upstream(
        stack: Stack, tm: httpx.AsyncClient) -> None:
    user, auth = await new_account(tm)
    calls = (await stats(stack))["calls"]
    r = await tm.post(f"/api/v1/admin/accounts/{user}/adjustments", headers=SVC,
                      json={"tokens": 9_990, "reason": "drain for the test"})
    assert r.status_code == 200, r.text
    r = await tm.post(CHAT, json=chat("too expensive"), headers=auth)
    assert r.status_code == 402, r.text
    err = r.json()["error"]
    assert (err["type"], err["code"], err["reason"], err["available"]) == \
        ("insufficient_quota", "insufficient_quota", "insufficient", 10)
    assert err["shortage"] == err["required"] - 10 and err["packages_url"] == "/api/v1/tokens/packages"
    assert r.headers["x-should-retry"] == "false"
    r = await tm.post(MESSAGES, json=anthropic("too expensive"), headers=auth)
    assert r.status_code == 402
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "billing_error"
    # no credentials, a bad one, a spoofed account: 401/403 in the shape, upstream untouched
    for headers, status in (({}, 401), ({"Authorization": "Bearer nope"}, 401),
                            ({**auth, "X-Tokenmeter-Account": "someone-else"}, 403)):
        r = await tm.post(CHAT, json=chat("hi"), headers=headers)
        assert r.status_code == status, r.text
        assert r.json()["error"]["message"]
    # bad input: 400, nothing charged
    other, other_auth = await new_account(tm)
    for raw in (b"not json", b"[1, 2]", b'{"model": 5}'):
        r = await tm.post(CHAT, content=raw, headers={**other_auth, "content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"
    assert (await balance(tm, other))["remaining"] == 10_000
    assert (await stats(stack))["calls"] == calls


async def test_a_service_key_names_the_account_and_x_api_key_works_for_anthropic(tm: httpx.AsyncClient) -> None:
    user, auth = await new_account(tm)
    r = await tm.post(CHAT, json=chat("as a service"), headers={**SVC, "X-Tokenmeter-Account": user})
    assert r.status_code == 200, r.text
    token = auth["Authorization"].removeprefix("Bearer ")
    r = await tm.post(MESSAGES, json=anthropic("as the sdk"), headers={"x-api-key": token})
    assert r.status_code == 200, r.text
    b = await settled(tm, user, 10_000)
    assert b["charged"] == billed(chat("as a service")) + billed(anthropic("as the sdk"))


async def test_a_retried_idempotency_key_is_charged_once_and_not_forwarded_again(
        stack: Stack, tm: httpx.AsyncClient) -> None:
    user, auth = await new_account(tm)
    key = {"Idempotency-Key": f"px-{uuid.uuid4().hex}"}
    calls = (await stats(stack))["calls"]
    first = await tm.post(CHAT, json=chat("once words:5"), headers={**auth, **key})
    assert first.status_code == 200
    for _ in range(3):
        r = await tm.post(CHAT, json=chat("once words:5"), headers={**auth, **key})
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "idempotency_key_used" and r.headers["x-should-retry"] == "false"
    b = await settled(tm, user, 10_000)
    assert b["charged"] == billed(chat("once words:5"))
    assert (await stats(stack))["calls"] == calls + 1


async def test_fifty_concurrent_streams_are_charged_exactly(tm: httpx.AsyncClient) -> None:
    user, auth = await new_account(tm, tokens=100_000)
    bodies = [chat(f"concurrent {i} words:{5 + i % 7}", stream=True) for i in range(50)]
    before = (await balance(tm, user))["remaining"]

    async def one(body: dict[str, Any]) -> int:
        async with tm.stream("POST", CHAT, json=body, headers=auth) as r:
            assert r.status_code == 200
            events, _ = await read_stream(r)
        return int(next(e["usage"]["total_tokens"] for e in events if e.get("usage")))

    reported = await asyncio.gather(*(one(b) for b in bodies))
    b = await settled(tm, user, before)
    assert b["reserved"] == 0
    assert b["charged"] == sum(reported) == sum(billed({**body, "stream_options": {}}) for body in bodies)


async def test_other_paths_pass_through_unmetered_when_allowed(stack: Stack, tm: httpx.AsyncClient) -> None:
    user, auth = await new_account(tm)
    r = await tm.get("/llm/openai/v1/models", headers=auth)
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "gpt-4o-mini"
    assert (await tm.get("/llm/openai/v1/models")).status_code == 401  # still authenticated
    assert (await balance(tm, user))["remaining"] == 10_000


async def test_a_large_prompt_without_max_tokens_is_held_at_the_plan_maximum(tm: httpx.AsyncClient) -> None:
    """Free plan: 8,192 tokens per request. A 7,000-token prompt plus our default output allowance
    would pass it; the hold is cut to the maximum, and the call is charged its reported usage."""
    user, auth = await new_account(tm)
    body = chat("x" * 28_000 + " words:3")
    r = await tm.post(CHAT, json=body, headers=auth)
    assert r.status_code == 200, r.text
    b = await settled(tm, user, 10_000)
    assert b["charged"] == billed(body)
    r = await tm.post(CHAT, json=chat("x" * 28_000, max_tokens=4_000), headers=auth)  # its own maximum: refused
    assert r.status_code == 400 and "per-request maximum" in r.json()["error"]["message"]
