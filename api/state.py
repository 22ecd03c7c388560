"""What the running app holds: the runtime (meter, Redis, database), auth material, tasks."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from api.auth_state import AuthState
from api.runtime import Runtime
from api.security import ApiKeyCache

__all__ = ["AppState", "app_state"]


@dataclass
class AppState:
    rt: Runtime
    jwt_secret: str
    key_cache: ApiKeyCache
    auth: AuthState
    tasks: list[Any] = field(default_factory=list)
    background: Any = None  # api.background.Background, set by the lifespan

    @classmethod
    def build(cls, rt: Runtime) -> AppState:
        s = rt.settings
        return cls(rt=rt, jwt_secret=s.jwt_secret or secrets.token_urlsafe(32),
                   key_cache=ApiKeyCache(s.api_key_cache_s, s.api_key_stale_s), auth=AuthState.build(rt))


async def app_state(request: Request) -> AppState:  # async: no thread-pool hop per request
    state: AppState = request.app.state.tm
    return state
