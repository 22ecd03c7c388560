"""The proxy as its users meet it: the OpenAI and Anthropic Python SDKs with `base_url` pointed at
tokenmeter, a tokenmeter user token as their API key. Streaming and not; a refusal raises the
SDK's own exception carrying our fields. Then an upstream that cannot be reached or is too slow:
502 and 504 with a JSON body, nothing charged."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

from loadtests.fake_llm import usage_for
from tests.gateways.servers import tokenmeter_server
from tests.processes import free_port
from tests.proxy.conftest import SVC, Stack, balance, new_account, proxy_env
from tests.proxy.test_proxy import billed, settled


def _token(auth: dict[str, str]) -> str:
    return auth["Authorization"].removeprefix("Bearer ")


async def test_the_openai_sdk_whole_and_streamed(stack: Stack, tm: httpx.AsyncClient) -> None:
    user, auth = await new_account(tm)
    client = openai.AsyncOpenAI(base_url=f"{stack.tm}/llm/openai/v1", api_key=_token(auth), max_retries=0)
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "sdk words:7"}]
    done = await client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    assert done.usage is not None and done.usage.completion_tokens == 7
    left = (await settled(tm, user, 10_000))["remaining"]
    assert 10_000 - left == done.usage.total_tokens

    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True)
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage:
            usage = chunk.usage
    assert text.count("w") == 7 and usage is not None
    b = await settled(tm, user, left)
    assert b["charged"] == usage.total_tokens and b["reserved"] == 0

    with_raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages)
    assert int(with_raw.headers["x-tokens-remaining"]) == (await balance(tm, user))["remaining"]
    await client.close()


async def test_the_openai_sdk_raises_its_own_errors_with_our_fields(stack: Stack, tm: httpx.AsyncClient) -> None:
    user, auth = await new_account(tm)
    await tm.post(f"/api/v1/admin/accounts/{user}/adjustments", headers=SVC, json={"tokens": 10_000, "reason": "t"})
    client = openai.AsyncOpenAI(base_url=f"{stack.tm}/llm/openai/v1", api_key=_token(auth))  # retries on
    with pytest.raises(openai.APIStatusError) as raised:
        await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert raised.value.status_code == 402
    body = raised.value.body
    assert isinstance(body, dict) and body["code"] == "insufficient_quota" and body["available"] == 0
    bad = openai.AsyncOpenAI(base_url=f"{stack.tm}/llm/openai/v1", api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await bad.embeddings.create(model="text-embedding-3-small", input="x")
    await client.close()
    await bad.close()


async def test_the_anthropic_sdk_whole_and_streamed(stack: Stack, tm: httpx.AsyncClient) -> None:
    user, auth = await new_account(tm)
    client = anthropic.AsyncAnthropic(base_url=f"{stack.tm}/llm/anthropic", api_key=_token(auth), max_retries=0)
    messages: list[anthropic.types.MessageParam] = [{"role": "user", "content": "claude words:6"}]
    done = await client.messages.create(model="claude-3-5-haiku-20241022", max_tokens=100, messages=messages)
    assert done.usage.output_tokens == 6
    left = (await settled(tm, user, 10_000))["remaining"]
    assert 10_000 - left == done.usage.input_tokens + done.usage.output_tokens

    async with client.messages.stream(model="claude-3-5-haiku-20241022", max_tokens=100,
                                      messages=messages) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text.count("w") == 6
    b = await settled(tm, user, left)
    assert b["charged"] == final.usage.input_tokens + final.usage.output_tokens == \
        billed({"model": "m", "messages": messages})
    await client.close()


async def test_an_unreachable_or_silent_upstream_is_a_502_or_504_and_charges_nothing(
        stack: Stack, tm: httpx.AsyncClient, tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp = tmp_path_factory.mktemp("proxy-down")
    up_port = int(stack.upstream.rsplit(":", 1)[1])
    env = {**proxy_env(up_port, TOKENMETER_PROXY_READ_TIMEOUT_S="1"),
           "TOKENMETER_UPSTREAM_ANTHROPIC": f"http://127.0.0.1:{free_port()}"}  # nothing listens there
    with tokenmeter_server(tmp, **env) as (port, _):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as other:
            user, auth = await new_account(other)
            r = await other.post("/llm/anthropic/v1/messages", headers=auth, json={
                "model": "claude-3-5-haiku-20241022", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]})
            assert r.status_code == 502, r.text
            assert r.json()["type"] == "error" and r.json()["error"]["code"] == "upstream_unreachable"
            r = await other.post("/llm/openai/v1/chat/completions", headers=auth, json={
                "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hang"}]})
            assert r.status_code == 504, r.text
            assert r.json()["error"]["code"] == "upstream_timeout"
            assert await balance(other, user) == {"remaining": 10_000, "reserved": 0}
            # passthrough is off on this one: other paths are a 404 in the vendor's shape
            r = await other.get("/llm/openai/v1/models", headers=auth)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert usage_for({"messages": []})[0] == 7  # (the fake's formula the books above rely on)
