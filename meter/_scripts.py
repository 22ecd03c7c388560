"""The script registry: Lua text from `lua/`, the wallet library prepended, SHA1 computed locally."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

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


class ScriptRegistry:
    """Every wallet operation's full script text and SHA1, keyed by operation name."""

    def __init__(self, directory: Traversable | None = None) -> None:
        folder = directory or lua_dir()
        library = folder.joinpath(LIBRARY).read_text("utf-8")
        self.scripts: dict[str, Script] = {}
        for op in OPERATIONS:
            body = folder.joinpath(f"wallet_{op}.lua").read_text("utf-8")
            text = f"{library}\n-- ===== wallet_{op}.lua =====\n{body}"
            sha = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()
            self.scripts[op] = Script(op, text, sha)

    def __getitem__(self, op: str) -> Script:
        return self.scripts[op]
