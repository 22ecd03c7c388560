"""The script registry: Lua text from `lua/`, the wallet library prepended, SHA1 computed locally."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

from meter._wire import IDEMPOTENCY_TTL_S, MAX_IDEMPOTENCY_TTL_S, MIN_IDEMPOTENCY_TTL_S

__all__ = ["OPERATIONS", "Script", "ScriptRegistry", "lua_dir"]

LIBRARY = "_wallet.lua"
OPERATIONS = ("adjust", "balance", "credit", "debit", "load", "open", "plan", "release", "reserve", "settle",
              "sweep", "usage")


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    text: str
    sha: str


def lua_dir() -> Traversable:
    """The Lua files: shipped in the wheel as meter/lua, or lua/ beside meter/ in a checkout."""
    packaged = resources.files("meter").joinpath("lua")
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "lua"


_TTL_LINE = re.compile(r"^local IDEM_TTL_S = \d+$", re.MULTILINE)


class ScriptRegistry:
    """Every wallet operation's full script text and SHA1, keyed by operation name.

    `idempotency_ttl_s` is how long a call's answer is kept for a retry: written into the
    library's `IDEM_TTL_S` (so a deployment's scripts, and their SHA1s, carry its retention)."""

    def __init__(self, directory: Traversable | None = None, *,
                 idempotency_ttl_s: int = IDEMPOTENCY_TTL_S) -> None:
        if isinstance(idempotency_ttl_s, bool) or not isinstance(idempotency_ttl_s, int) \
                or not MIN_IDEMPOTENCY_TTL_S <= idempotency_ttl_s <= MAX_IDEMPOTENCY_TTL_S:
            raise ValueError(f"idempotency_ttl_s must be an integer in [{MIN_IDEMPOTENCY_TTL_S}, "
                             f"{MAX_IDEMPOTENCY_TTL_S}], got {idempotency_ttl_s!r}")
        self.idempotency_ttl_s = idempotency_ttl_s
        folder = directory or lua_dir()
        text = folder.joinpath(LIBRARY).read_text("utf-8")
        library, n = _TTL_LINE.subn(f"local IDEM_TTL_S = {idempotency_ttl_s}", text)
        if n != 1:
            raise ValueError(f"{LIBRARY} must set IDEM_TTL_S once")
        self.scripts: dict[str, Script] = {}
        for op in OPERATIONS:
            body = folder.joinpath(f"wallet_{op}.lua").read_text("utf-8")
            text = f"{library}\n-- ===== wallet_{op}.lua =====\n{body}"
            sha = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()
            self.scripts[op] = Script(op, text, sha)

    def __getitem__(self, op: str) -> Script:
        return self.scripts[op]
