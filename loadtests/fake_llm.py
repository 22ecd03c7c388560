"""A fake LLM upstream speaking OpenAI (chat, completions, responses, embeddings) and Anthropic
(messages), streamed or not, run as its own process by the proxy tests (tests/proxy) and the
proxy benchmark (loadtests/bench_proxy.py):

    python -m loadtests.fake_llm --port N

Its usage figures are a function of the request, and every answer carries them, so a test can
compare what the proxy charged with what the upstream reported. The last user message steers it:

    words:N     answer N words (default 8)          slow        0.2 s between stream chunks
    fail:S      answer status S with an error body  hang        wait 30 s before answering
    break       cut the stream after 3 words        nousage     stream without a usage chunk
    breakfirst  cut the stream before any output

GET /_stats tells how many calls came, how many streams were sent to the end, and the headers of
the last call (the tests check the caller's credentials never arrive here).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

STATS: dict[str, Any] = {"calls": 0, "completed": 0, "last_headers": {}, "paths": []}
UPSTREAM_KEY = "sk-upstream-secret-for-tests"


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(_text(v) for v in value)
    if isinstance(value, dict):
        return _text(value.get("text") or value.get("content") or "")
    return ""


def _prompt(body: dict[str, Any]) -> str:
    parts = [_text(body.get(k)) for k in ("messages", "prompt", "input", "system", "instructions")]
    return " ".join(p for p in parts if p)


def usage_for(body: dict[str, Any]) -> tuple[int, int, list[str]]:
    """(input tokens, output tokens, the words answered): what this upstream bills for a request."""
    prompt = _prompt(body)
    m = re.search(r"words:(\d+)", prompt)
    n = int(m.group(1)) if m else 8
    return 7 + len(prompt) // 3, n, [f"w{i} " for i in range(n)]


class Stop(Exception):
    """Raised inside a stream to cut the connection."""


def _sse(event: dict[str, Any], name: str | None = None) -> bytes:
    head = f"event: {name}\n" if name else ""
    return (head + "data: " + json.dumps(event) + "\n\n").encode()


async def _openai_stream(kind: str, body: dict[str, Any], prompt: str) -> AsyncIterator[bytes]:
    inp, out, words = usage_for(body)
    model = body.get("model", "gpt-4o-mini")
    pause = 0.2 if "slow" in prompt else 0.0
    if "breakfirst" in prompt:
        raise Stop
    if kind == "responses":
        yield _sse({"type": "response.created", "response": {"id": "resp_1", "model": model}})
    for i, word in enumerate(words):
        if "break" in prompt and i == 3:
            raise Stop
        if pause:
            await asyncio.sleep(pause)
        if kind == "responses":
            yield _sse({"type": "response.output_text.delta", "delta": word})
        elif kind == "completions":
            yield _sse({"id": "c1", "object": "text_completion", "model": model, "choices": [{"text": word}]})
        else:
            yield _sse({"id": "c1", "object": "chat.completion.chunk", "model": model,
                        "choices": [{"index": 0, "delta": {"content": word}}]})
    if kind == "responses":
        usage = {"input_tokens": inp, "output_tokens": out, "input_tokens_details": {"cached_tokens": 0},
                 "total_tokens": inp + out}
        if "nousage" not in prompt:
            yield _sse({"type": "response.completed", "response": {"id": "resp_1", "model": model, "usage": usage}})
    else:
        include = (body.get("stream_options") or {}).get("include_usage")
        if include and "nousage" not in prompt:
            yield _sse({"id": "c1", "object": "chat.completion.chunk", "model": model, "choices": [],
                        "usage": {"prompt_tokens": inp, "completion_tokens": out, "total_tokens": inp + out}})
        yield b"data: [DONE]\n\n"
    STATS["completed"] += 1


async def _anthropic_stream(body: dict[str, Any], prompt: str) -> AsyncIterator[bytes]:
    inp, out, words = usage_for(body)
    model = body.get("model", "claude-3-5-haiku-20241022")
    pause = 0.2 if "slow" in prompt else 0.0
    yield _sse({"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": None,
        "stop_sequence": None, "usage": {"input_tokens": inp, "output_tokens": 1}}}, "message_start")
    if "breakfirst" in prompt:
        raise Stop
    yield _sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
               "content_block_start")
    for i, word in enumerate(words):
        if "break" in prompt and i == 3:
            raise Stop
        if pause:
            await asyncio.sleep(pause)
        yield _sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}},
                   "content_block_delta")
    yield _sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
    if "nousage" not in prompt:
        yield _sse({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": out}},
                   "message_delta")
    yield _sse({"type": "message_stop"}, "message_stop")
    STATS["completed"] += 1


def _whole(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    inp, out, words = usage_for(body)
    model = body.get("model", "m")
    text = "".join(words)
    if kind == "messages":
        return {"id": "msg_1", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": text}], "usage": {"input_tokens": inp, "output_tokens": out}}
    if kind == "responses":
        return {"id": "resp_1", "object": "response", "model": model, "status": "completed",
                "output": [{"type": "message", "role": "assistant",
                            "content": [{"type": "output_text", "text": text, "annotations": []}]}],
                "usage": {"input_tokens": inp, "output_tokens": out, "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": inp + out}}
    if kind == "embeddings":
        return {"object": "list", "model": model, "data": [{"object": "embedding", "index": 0,
                                                            "embedding": [0.1, 0.2, 0.3]}],
                "usage": {"prompt_tokens": inp, "total_tokens": inp}}
    choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
    if kind == "completions":
        choice["text"] = text
    else:
        choice["message"] = {"role": "assistant", "content": text}
    return {"id": "c1", "object": "chat.completion" if kind == "chat" else "text_completion", "created": 1,
            "model": model, "choices": [choice],
            "usage": {"prompt_tokens": inp, "completion_tokens": out, "total_tokens": inp + out}}


def _error(status: int, anthropic: bool) -> JSONResponse:
    if anthropic:
        return JSONResponse({"type": "error", "error": {"type": "api_error", "message": "upstream says no"}},
                            status_code=status)
    return JSONResponse({"error": {"message": "upstream says no", "type": "server_error", "code": None}},
                        status_code=status)


def endpoint(kind: str) -> Any:
    async def handle(request: Request) -> Response:
        STATS["calls"] += 1
        STATS["paths"].append(request.url.path)
        STATS["last_headers"] = dict(request.headers)
        anthropic = kind == "messages"
        want = "x-api-key" if anthropic else "authorization"
        if request.headers.get(want, "").removeprefix("Bearer ") != UPSTREAM_KEY:
            return _error(401, anthropic)
        body = await request.json()
        prompt = _prompt(body)
        if m := re.search(r"fail:(\d{3})", prompt):
            return _error(int(m.group(1)), anthropic)
        if "hang" in prompt:
            await asyncio.sleep(30)
        if body.get("stream"):
            source = _anthropic_stream(body, prompt) if anthropic else _openai_stream(kind, body, prompt)
            return StreamingResponse(source, media_type="text/event-stream")
        return JSONResponse(_whole(kind, body), headers={"x-request-id": "req_fake", "x-ratelimit-limit-tokens": "1"})
    return handle


async def stats(request: Request) -> Response:
    return JSONResponse({k: v for k, v in STATS.items() if k != "paths"} | {"paths": STATS["paths"][-50:]})


async def models(request: Request) -> Response:
    STATS["calls"] += 1
    return JSONResponse({"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"}]})


app = Starlette(routes=[
    Route("/v1/chat/completions", endpoint("chat"), methods=["POST"]),
    Route("/v1/completions", endpoint("completions"), methods=["POST"]),
    Route("/v1/responses", endpoint("responses"), methods=["POST"]),
    Route("/v1/embeddings", endpoint("embeddings"), methods=["POST"]),
    Route("/v1/messages", endpoint("messages"), methods=["POST"]),
    Route("/v1/models", models, methods=["GET"]),
    Route("/_stats", stats, methods=["GET"]),
])


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
