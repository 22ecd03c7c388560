"""Input checks done before any script runs: each raises InvalidInput naming the field."""

from __future__ import annotations

import re

from meter._catalog import MAX_INT
from meter._errors import InvalidInput

__all__ = ["MAX_HOLD_TTL_MS", "check_account_id", "check_hold_id", "check_int", "check_request_id",
           "check_text"]

_ACCOUNT_RE = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
_HOLD_RE = re.compile(r"[0-9]{1,16}")
MAX_HOLD_TTL_MS = 86_400_000


def check_account_id(account_id: object) -> str:
    if not isinstance(account_id, str) or not _ACCOUNT_RE.fullmatch(account_id):
        raise InvalidInput("account_id", "must be 1-128 characters of A-Z a-z 0-9 . _ : @ -")
    return account_id


def check_int(field: str, value: object, *, low: int = 1, high: int = MAX_INT - 1) -> int:
    """An integer (not a bool or float) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(field, f"must be an integer, got {type(value).__name__}")
    if value < low:
        raise InvalidInput(field, f"must be at least {low}, got {value}")
    if value > high:
        raise InvalidInput(field, f"must be at most {high}, got {value}")
    return value


def check_request_id(request_id: object) -> str:
    """'' (none) or 1-255 printable characters without tabs or newlines."""
    if request_id is None:
        return ""
    if not isinstance(request_id, str) or not 0 < len(request_id) <= 255 or not request_id.isprintable():
        raise InvalidInput("request_id", "must be 1-255 printable characters")
    return request_id


def check_hold_id(hold_id: object) -> str:
    if not isinstance(hold_id, str) or not _HOLD_RE.fullmatch(hold_id):
        raise InvalidInput("hold_id", "must be the hold id returned by reserve")
    return hold_id


def check_text(field: str, value: object, max_len: int = 128) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > max_len or not value.isprintable():
        raise InvalidInput(field, f"must be at most {max_len} printable characters")
    return value
