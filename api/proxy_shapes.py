"""What the metering proxy knows about the two API shapes it fronts (OpenAI and Anthropic). Pure:
no I/O, so every rule here is tested on its own.

- `estimate`: the tokens to hold before a call, from the request body alone (no tokenizer: about
  one token per 4 bytes of text, plus a few per message), plus the output the call may produce.
- `vendor_error`: one of our answers (the brief's body) in the vendor's own error shape, so an
  OpenAI or Anthropic SDK raises its usual exception with our fields inside.
- `StreamTap`: reads a Server-Sent Events stream as it passes, without holding it, for the usage
  the upstream reports and an estimate of what was streamed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from meter.usage import Usage, parse_usage

__all__ = ["ENDPOINTS", "Endpoint", "Estimate", "StreamTap", "Vendor", "estimate", "text_tokens", "vendor_error"]

Vendor = Literal["openai", "anthropic"]
BYTES_PER_TOKEN = 4  # English text averages ~4 bytes per token in the GPT and Claude tokenizers
MESSAGE_OVERHEAD = 4  # role and separators of one chat message
MAX_LINE = 1_048_576  # an SSE line longer than this is passed through but not parsed


@dataclass(frozen=True, slots=True)
class Endpoint:
    vendor: Vendor
    path: str  # under the vendor's prefix, as the SDKs send it
    output: bool  # does the call produce output tokens (embeddings do not)


ENDPOINTS = (
    Endpoint("openai", "/v1/chat/completions", True),
    Endpoint("openai", "/v1/completions", True),
    Endpoint("openai", "/v1/responses", True),
    Endpoint("openai", "/v1/embeddings", False),
    Endpoint("anthropic", "/v1/messages", True),
)


def text_tokens(n_bytes: int) -> int:
    return -(-n_bytes // BYTES_PER_TOKEN)


def _text_bytes(value: Any) -> int:
    """UTF-8 bytes of the text in a prompt value: strings, lists of parts, {'text': ...} parts,
    tool calls and anything else JSON (counted as its JSON text; images by their URL or data)."""
    if isinstance(value, str):
        return len(value.encode("utf-8", "replace"))
    if isinstance(value, list):
        return sum(_text_bytes(v) for v in value)
    if isinstance(value, Mapping):
        if isinstance(value.get("text"), str):
            return _text_bytes(value["text"])
        if isinstance(value.get("content"), (str, list)):
            return _text_bytes(value["content"]) + MESSAGE_OVERHEAD * BYTES_PER_TOKEN
        return len(json.dumps(value, separators=(",", ":"), default=str))
    if value is None or isinstance(value, bool):
        return 0
    return len(str(value))


@dataclass(frozen=True, slots=True)
class Estimate:
    input_tokens: int
    output_tokens: int  # the most the call may produce: max_tokens, or the configured default
    output_given: bool  # the request set its own maximum

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens


def _max_output(body: Mapping[str, Any], names: tuple[str, ...]) -> int | None:
    for name in names:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def estimate(endpoint: Endpoint, body: Mapping[str, Any], default_output: int) -> Estimate:
    """Tokens to hold for a call: the prompt's text, the instructions and tools, plus its output
    maximum (`max_tokens`, `max_completion_tokens`, `max_output_tokens`) or `default_output`."""
    prompt = 0
    for name in ("messages", "prompt", "input", "system", "instructions", "tools", "functions"):
        if name in body:
            prompt += _text_bytes(body[name])
    n_messages = len(body["messages"]) if isinstance(body.get("messages"), list) else 0
    input_tokens = text_tokens(prompt) + MESSAGE_OVERHEAD * n_messages + (3 if n_messages else 0)
    if not endpoint.output:
        return Estimate(max(input_tokens, 1), 0, True)
    given = _max_output(body, ("max_completion_tokens", "max_tokens", "max_output_tokens"))
    n = body.get("n")
    choices = n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 128 else 1
    output = (default_output if given is None else given) * choices
    return Estimate(max(input_tokens, 1), output, given is not None)


# -- errors in the vendor's shape ------------------------------------------------------------------

_OPENAI_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 402: "insufficient_quota",
                 403: "permission_error", 404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
                 422: "invalid_request_error", 429: "rate_limit_exceeded", 502: "upstream_error",
                 503: "service_unavailable", 504: "timeout"}
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                    403: "permission_error", 404: "not_found_error", 409: "invalid_request_error",
                    413: "request_too_large", 422: "invalid_request_error", 429: "rate_limit_error",
                    502: "api_error", 503: "overloaded_error", 504: "timeout_error"}


def vendor_error(vendor: Vendor, status: int, body: Mapping[str, Any]) -> dict[str, Any]:
    """Our answer `body` (the brief's fields: error, message, required, available, shortage,
    packages_url, reason, ...) as the vendor's error object, every field of ours kept inside it."""
    ours = {k: v for k, v in body.items() if k not in ("error", "message")}
    code = str(body.get("reason") or body.get("error") or "error")
    if status == 402:
        code = "insufficient_quota"
    message = str(body.get("message") or body.get("error") or "request refused")
    if vendor == "anthropic":
        kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": message, "code": code, **ours}}
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": body.get("field"), "code": code, **ours}}


# -- the stream tap --------------------------------------------------------------------------------

class StreamTap:
    """Fed the raw bytes of an SSE stream as they pass; remembers the usage the upstream reports
    (OpenAI's final `usage` chunk, Responses' `response.completed`, Anthropic's `message_start`
    and `message_delta`) and counts the bytes of text streamed, for an estimate when the stream is
    cut before its usage came. Lines are parsed only when complete; nothing is held beyond one."""

    def __init__(self, vendor: Vendor) -> None:
        self.vendor = vendor
        self._partial = b""
        self.text_bytes = 0  # of the generated text seen so far
        self.usage: Usage | None = None  # the last complete usage reported
        self.input_tokens: int | None = None  # Anthropic: known from message_start
        self.output_tokens = 0  # Anthropic: the running count of message_delta
        self.model: str | None = None
        self.error = False  # the stream carried an error event
        self._cached = 0

    def feed(self, chunk: bytes) -> None:
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > MAX_LINE:
            self._partial = b""
        for line in lines:
            if line.startswith(b"data:"):
                self._event(line[5:].strip())

    def close(self) -> None:
        if self._partial.startswith(b"data:"):
            self._event(self._partial[5:].strip())
        self._partial = b""

    def _event(self, payload: bytes) -> None:
        if not payload or payload == b"[DONE]" or len(payload) > MAX_LINE:
            return
        try:
            event = json.loads(payload)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        try:
            if self.vendor == "anthropic":
                self._anthropic(event)
            else:
                self._openai(event)
        except (ValueError, TypeError):  # a malformed usage object: keep what was known
            pass

    def _openai(self, event: dict[str, Any]) -> None:
        if isinstance(event.get("model"), str):
            self.model = event["model"]
        kind = event.get("type")
        if kind == "error" or ("error" in event and not event.get("choices")):
            self.error = True
        if isinstance(kind, str) and kind.startswith("response."):  # the Responses API
            if kind == "response.output_text.delta" and isinstance(event.get("delta"), str):
                self.text_bytes += len(event["delta"].encode())
            response = event.get("response")
            if isinstance(response, dict):
                if isinstance(response.get("model"), str):
                    self.model = response["model"]
                if isinstance(response.get("usage"), dict):
                    self.usage = parse_usage(response["usage"])
                if kind == "response.failed":
                    self.error = True
            return
        for choice in event.get("choices") or ():
            if isinstance(choice, dict):
                delta = choice.get("delta")
                text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
                if isinstance(text, str):
                    self.text_bytes += len(text.encode())
        if isinstance(event.get("usage"), dict):
            self.usage = parse_usage(event["usage"])

    def _anthropic(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "message_start" and isinstance(event.get("message"), dict):
            message = event["message"]
            if isinstance(message.get("model"), str):
                self.model = message["model"]
            if isinstance(message.get("usage"), dict):
                start = parse_usage({"output_tokens": 0, **message["usage"]})
                self.input_tokens, self.output_tokens = start.input_tokens, start.output_tokens
                self._cached = start.cached_tokens
        elif kind == "content_block_delta" and isinstance(event.get("delta"), dict):
            delta = event["delta"]
            text = delta.get("text") if isinstance(delta.get("text"), str) else delta.get("partial_json")
            if isinstance(text, str):
                self.text_bytes += len(text.encode())
        elif kind == "message_delta" and isinstance(event.get("usage"), dict):
            out = event["usage"].get("output_tokens")
            if isinstance(out, int) and not isinstance(out, bool) and out >= 0:
                self.output_tokens = out  # cumulative, per Anthropic's streaming docs
        elif kind == "message_stop" and self.input_tokens is not None:
            self.usage = Usage(self.input_tokens, self.output_tokens, self._cached)
        elif kind == "error":
            self.error = True

    def best_usage(self, input_estimate: int) -> tuple[Usage, bool]:
        """(usage, reported): what the upstream reported, else the best estimate from what was
        seen (the input the upstream reported or the estimate; output at least what was streamed)."""
        if self.usage is not None:
            return self.usage, True
        streamed = text_tokens(self.text_bytes)
        inp = self.input_tokens if self.input_tokens is not None else input_estimate
        return Usage(inp, max(self.output_tokens, streamed)), False
