"""Provider usage objects → tokens to charge. Pure (no I/O); used by the gateway settle, the
usage endpoint and the metering proxy.

Shapes understood (an object, or a whole response that carries one under "usage"):
- OpenAI Chat Completions / Completions / Embeddings: `prompt_tokens`, `completion_tokens`
  (absent for embeddings), `prompt_tokens_details.cached_tokens`.
- OpenAI Responses: `input_tokens`, `output_tokens`, `input_tokens_details.cached_tokens`.
- Anthropic Messages: `input_tokens` (uncached input only), `output_tokens`,
  `cache_creation_input_tokens`, `cache_read_input_tokens`.

Every token the provider processed is charged: input (cached or not) plus output.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meter._catalog import MAX_INT
from meter._errors import InvalidInput

__all__ = ["Usage", "parse_usage"]


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int  # all input, cache reads and writes included
    output_tokens: int
    cached_tokens: int = 0  # the part of the input read from the provider's prompt cache

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens


def _count(usage: Mapping[str, Any], key: str, where: str) -> int:
    value = usage.get(key, 0)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_INT:
        raise InvalidInput(f"{where}.{key}", "must be a non-negative integer")
    return value


def _details(usage: Mapping[str, Any], key: str, where: str) -> int:
    details = usage.get(key)
    if details is None:
        return 0
    if not isinstance(details, Mapping):
        raise InvalidInput(f"{where}.{key}", "must be an object")
    return _count(details, "cached_tokens", f"{where}.{key}")


def parse_usage(body: object, where: str = "usage") -> Usage:
    """The Usage of an OpenAI or Anthropic usage object (or of a response holding one);
    InvalidInput naming the field when it is neither."""
    if isinstance(body, Mapping) and isinstance(body.get("usage"), Mapping):
        body = body["usage"]
    if not isinstance(body, Mapping):
        raise InvalidInput(where, "must be an OpenAI or Anthropic usage object")
    if "prompt_tokens" in body:  # OpenAI chat, completions, embeddings
        inp = _count(body, "prompt_tokens", where)
        out = _count(body, "completion_tokens", where)
        cached = _details(body, "prompt_tokens_details", where)
    elif "input_tokens" in body or "output_tokens" in body:
        out = _count(body, "output_tokens", where)
        if "input_tokens_details" in body:  # OpenAI Responses: input_tokens includes the cached part
            inp = _count(body, "input_tokens", where)
            cached = _details(body, "input_tokens_details", where)
        else:  # Anthropic: input_tokens excludes the cache writes and reads
            written = _count(body, "cache_creation_input_tokens", where)
            cached = _count(body, "cache_read_input_tokens", where)
            inp = _count(body, "input_tokens", where) + written + cached
    else:
        raise InvalidInput(where, "must hold prompt_tokens/completion_tokens (OpenAI) "
                                  "or input_tokens/output_tokens (OpenAI Responses, Anthropic)")
    if inp + out >= MAX_INT:
        raise InvalidInput(where, "token counts too large")
    return Usage(inp, out, min(cached, inp))
