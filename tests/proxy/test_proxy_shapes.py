"""The proxy's pure parts: the estimate, the vendor error shapes, and the stream tap fed the same
stream cut at every possible place (a chunk boundary must never change what is read)."""

from __future__ import annotations

import itertools
import json

from hypothesis import given
from hypothesis import strategies as st

from api.proxy_shapes import ENDPOINTS, StreamTap, estimate, vendor_error
from meter.usage import Usage

CHAT, _, RESPONSES, EMBEDDINGS, MESSAGES = ENDPOINTS


def test_estimate_counts_the_prompt_and_the_output_maximum() -> None:
    body = {"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 50}
    e = estimate(CHAT, body, default_output=1000)
    assert (e.input_tokens, e.output_tokens, e.output_given) == (100 + 4 + 4 + 3, 50, True)
    e = estimate(CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "y" * 40}]}]}, 1000)
    assert e.output_tokens == 1000 and not e.output_given and e.input_tokens >= 10
    assert estimate(CHAT, {"messages": [], "max_tokens": 10, "n": 3}, 5).output_tokens == 30
    assert estimate(RESPONSES, {"input": "z" * 8, "max_output_tokens": 7}, 5).total == 2 + 7
    assert estimate(EMBEDDINGS, {"input": ["a" * 8, "b" * 8]}, 500).total == 4  # no output
    assert estimate(MESSAGES, {"system": "s" * 4, "messages": [], "max_tokens": 1}, 9).total == 1 + 1 + 0


def test_vendor_errors_keep_our_fields() -> None:
    ours = {"error": "Insufficient tokens", "message": "Need 5 more tokens. Current balance: 1", "required": 6,
            "available": 1, "shortage": 5, "packages_url": "/api/v1/tokens/packages", "reason": "insufficient"}
    o = vendor_error("openai", 402, ours)["error"]
    assert (o["type"], o["code"], o["shortage"], o["message"]) == ("insufficient_quota", "insufficient_quota", 5,
                                                                   ours["message"])
    a = vendor_error("anthropic", 429, {"error": "x", "message": "slow down", "reason": "daily_cap"})
    assert a["type"] == "error" and a["error"]["type"] == "rate_limit_error" and a["error"]["code"] == "daily_cap"
    assert vendor_error("anthropic", 503, {"error": "store_unavailable", "message": "m"})["error"]["type"] == \
        "overloaded_error"


def _sse(events: list[dict[str, object]]) -> bytes:
    return b"".join(b"event: x\ndata: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


OPENAI_STREAM = _sse([{"choices": [{"delta": {"content": "héllo "}}], "model": "gpt-4o-mini-2024-07-18"},
                      {"choices": [{"delta": {"content": "world"}}]},
                      {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 2,
                                                "prompt_tokens_details": {"cached_tokens": 4}}}])
ANTHROPIC_STREAM = _sse([{"type": "message_start", "message": {"model": "claude-3-5-haiku-20241022", "usage": {
                             "input_tokens": 9, "cache_read_input_tokens": 3, "output_tokens": 1}}},
                         {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "bonjour"}},
                         {"type": "message_delta", "usage": {"output_tokens": 5}},
                         {"type": "message_stop"}])


@given(st.lists(st.integers(min_value=0, max_value=len(OPENAI_STREAM)), max_size=12))
def test_the_tap_reads_an_openai_stream_whatever_its_chunks(cuts: list[int]) -> None:
    tap = StreamTap("openai")
    points = [0, *sorted(cuts), len(OPENAI_STREAM)]
    for a, b in itertools.pairwise(points):
        tap.feed(OPENAI_STREAM[a:b])
    tap.close()
    assert tap.best_usage(1000) == (Usage(11, 2, 4), True)
    assert tap.text_bytes == len("héllo world".encode()) and tap.model == "gpt-4o-mini-2024-07-18"


@given(st.lists(st.integers(min_value=0, max_value=len(ANTHROPIC_STREAM)), max_size=12))
def test_the_tap_reads_an_anthropic_stream_whatever_its_chunks(cuts: list[int]) -> None:
    tap = StreamTap("anthropic")
    points = [0, *sorted(cuts), len(ANTHROPIC_STREAM)]
    for a, b in itertools.pairwise(points):
        tap.feed(ANTHROPIC_STREAM[a:b])
    assert tap.best_usage(1000) == (Usage(12, 5, 3), True)


def test_a_cut_stream_is_estimated_from_what_passed() -> None:
    tap = StreamTap("anthropic")
    tap.feed(ANTHROPIC_STREAM[:ANTHROPIC_STREAM.index(b"message_delta")])
    usage, reported = tap.best_usage(1000)
    assert not reported and usage == Usage(12, 2)  # the reported input; 7 bytes streamed = 2 tokens
    tap = StreamTap("openai")
    tap.feed(b'data: {"choices": [{"delta": {"content": "abcdefghi"}}]}\n\ndata: {"choi')
    assert tap.best_usage(40) == (Usage(40, 3), False)  # the input estimate; 9 bytes = 3 tokens


def test_garbage_in_a_stream_is_ignored() -> None:
    tap = StreamTap("openai")
    tap.feed(b"data: {not json\n\ndata: [1,2]\n\ndata: {\"usage\": {\"prompt_tokens\": -1}}\n\n: comment\n\n")
    assert tap.best_usage(5) == (Usage(5, 0), False)
