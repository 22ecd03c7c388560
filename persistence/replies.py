"""Redis replies as the app's connections give them: text.

Every Redis client tokenmeter builds decodes replies (`decode_responses=True`), so each key,
field and value comes back a str; redis-py's types also allow bytes (and None for a reply that
may be missing). These functions narrow a reply once, checked: a connection that does not decode
fails loudly here instead of writing "b'...'" somewhere downstream.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["fields", "optional_text", "text", "texts"]


def text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a decoded Redis reply (str), got {type(value).__name__}")
    return value


def optional_text(value: object) -> str | None:
    return None if value is None else text(value)


def texts(values: Iterable[object] | None) -> list[str]:
    return [text(v) for v in values or ()]


def fields(entry: Mapping[Any, Any] | None) -> dict[str, str]:
    """A stream entry's fields (none for an entry deleted while pending, in claim replies)."""
    return {text(k): text(v) for k, v in (entry or {}).items()}
