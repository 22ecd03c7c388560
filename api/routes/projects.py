"""Projects: create one, execute it (the brief's flow: check the estimate, then each agent in
order: reserve its estimate → run → settle the actual usage, one transaction per agent)."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from api.agents import AgentRunner
from api.deps import current_user
from api.errors import error_body
from api.metering import json_response
from api.state import AppState, app_state
from meter._http import PACKAGES_URL, decision_headers, denial_body, insufficient_body
from persistence.models import Project

router = APIRouter(prefix="/api/v1/projects", tags=["projects"])


class ProjectIn(BaseModel):
    title: str = Field(min_length=1, max_length=200, examples=["Library management system"])
    description: str | None = Field(default=None, max_length=5000)


def runner_of(state: AppState) -> AgentRunner:
    return state.agent_runner


@router.post("", status_code=201, summary="Create a project")
async def create_project(body: ProjectIn, account_id: str = Depends(current_user),
                         state: AppState = Depends(app_state)) -> dict[str, Any]:
    project = Project(id=str(uuid.uuid4()), account_id=account_id, title=body.title,
                      description=body.description, status="created")
    async with state.rt.db.sessions() as session, session.begin():
        session.add(project)
    return {"id": project.id, "title": project.title, "description": project.description, "status": "created"}


@router.get("/estimate", summary="Whether the balance covers the next project run (the 402 body's figures)")
async def estimate(account_id: str = Depends(current_user), state: AppState = Depends(app_state)) -> dict[str, Any]:
    """What `execute` checks first, asked ahead: the dashboard's out-of-tokens banner shows the
    shortage before a run is refused. `shortage` is 0 when the balance covers the estimate."""
    required = state.rt.catalog.project_estimate_tokens
    available = (await state.rt.meter.balance(account_id)).remaining_tokens
    return {"required": required, "available": available, "shortage": max(required - available, 0),
            "sufficient": available >= required, "packages_url": PACKAGES_URL}


@router.post("/{project_id}/execute", summary="Run the agents in order, metering each one",
             responses={402: {"description": "insufficient tokens (the brief's body)"}})
async def execute(project_id: str, account_id: str = Depends(current_user),
                  state: AppState = Depends(app_state)) -> Response:
    rt = state.rt
    async with rt.db.sessions() as session:
        project = await session.get(Project, project_id)
    if project is None or project.account_id != account_id:  # another user's project is not found
        raise HTTPException(404, detail=error_body("not_found", f"no project {project_id!r}"))
    agents = list(rt.catalog.agents.values())
    required = rt.catalog.project_estimate_tokens
    available = (await rt.meter.balance(account_id)).remaining_tokens
    if available < required:
        return JSONResponse(status_code=402, content=insufficient_body(required, available))
    run_id = uuid.uuid4().hex[:12]
    runner = runner_of(state)
    results: list[dict[str, Any]] = []
    for agent in agents:
        hold = await rt.meter.reserve(account_id, agent.estimate_tokens, agent=agent.id, model=agent.model,
                                      project_id=project_id, request_id=f"run:{run_id}:{agent.id}:hold")
        if not hold.allowed or hold.hold_id is None:  # e.g. the daily cap: stop, report what ran
            status = 402 if hold.reason == "insufficient" else 429
            # the denial's headers as the meter endpoints give them (X-Tokens-*, RateLimit-*, Retry-After)
            return json_response(status, {**denial_body(hold), "project_id": project_id,
                                          "stopped_at_agent": agent.id, "agents": results},
                                 decision_headers(hold, rt.meter.clock.now_ms()))
        try:
            usage = await runner.run(project_id, agent)
        except Exception:
            await rt.meter.release(account_id, hold.hold_id, request_id=f"run:{run_id}:{agent.id}:release")
            raise
        receipt = await rt.meter.settle(account_id, hold.hold_id, usage.total, agent=agent.id, model=agent.model,
                                        input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
                                        project_id=project_id, request_id=f"run:{run_id}:{agent.id}:settle")
        results.append({"agent": agent.id, "name": agent.name, "model": agent.model,
                        "estimated_tokens": agent.estimate_tokens, "tokens_used": receipt.charged,
                        "input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
                        "uncollected_tokens": receipt.uncollected, "transaction_id": receipt.transaction_id})
    balance = await rt.meter.balance(account_id)
    return JSONResponse({"project_id": project_id, "status": "completed", "agents": results,
                         "total_tokens": sum(r["tokens_used"] for r in results),
                         "remaining_tokens": balance.remaining_tokens},
                        headers={"X-Tokens-Remaining": str(balance.remaining_tokens),
                                 "X-Tokens-Used-Today": str(balance.tokens_used_today),
                                 "X-Requests-Today": str(balance.requests_today)})
