"""What the running app holds: the runtime (meter, Redis, database), auth material, tasks."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from api.agents import AgentRunner, SimulatedAgentRunner
from api.auth_state import AuthState
from api.payments import Payments
from api.proxy import LlmProxy
from api.runtime import Runtime
from api.security import ApiKeyCache

__all__ = ["AppState", "app_state", "payments", "payments_of"]


@dataclass
class AppState:
    rt: Runtime
    jwt_secret: str
    key_cache: ApiKeyCache
    auth: AuthState
    payments: Payments  # the payment providers (api/payments.py)
    agent_runner: AgentRunner  # what runs a project's agents (api/agents.py; a simulation by default)
    proxy: LlmProxy | None = None  # the metering proxy's upstreams (api/proxy.py), when configured
    tasks: list[Any] = field(default_factory=list)
    background: Any = None  # api.background.Background, set by the lifespan

    @classmethod
    def build(cls, rt: Runtime, *, agent_runner: AgentRunner | None = None) -> AppState:
        """Every dependency of the app, built in this one place (the lifespan calls it)."""
        s = rt.settings
        return cls(rt=rt, jwt_secret=s.jwt_secret or secrets.token_urlsafe(32),
                   key_cache=ApiKeyCache(s.api_key_cache_s, s.api_key_stale_s), auth=AuthState.build(rt),
                   payments=Payments.build(s), agent_runner=agent_runner or SimulatedAgentRunner(),
                   proxy=LlmProxy(s) if s.proxy_enabled else None)


async def app_state(request: Request) -> AppState:  # async: no thread-pool hop per request
    state: AppState = request.app.state.tm
    return state


def payments_of(app: Any) -> Payments:
    """A running app's payment providers."""
    state: AppState = app.state.tm
    return state.payments


def payments(request: Request) -> Payments:
    """FastAPI dependency: the running app's payment providers."""
    return payments_of(request.app)
