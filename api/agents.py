"""Agent runners: what executing a project's agent costs. The runner is an interface; the
default one is a simulation (no LLM is called) that reports usage near each agent's estimate."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

from meter import Agent

__all__ = ["AgentRunner", "AgentUsage", "SimulatedAgentRunner"]


@dataclass(frozen=True, slots=True)
class AgentUsage:
    input_tokens: int
    output_tokens: int

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens


class AgentRunner(Protocol):
    async def run(self, project_id: str, agent: Agent) -> AgentUsage: ...


class SimulatedAgentRunner:
    """A simulation, not a model call: usage is 70-95% of the agent's estimate (estimates are
    upper bounds), deterministic per project and agent, split 30% input / 70% output."""

    async def run(self, project_id: str, agent: Agent) -> AgentUsage:
        h = int.from_bytes(hashlib.sha256(f"{project_id}:{agent.id}".encode()).digest()[:4], "big")
        total = agent.estimate_tokens * (70 + h % 26) // 100
        inp = total * 3 // 10
        return AgentUsage(input_tokens=inp, output_tokens=total - inp)
