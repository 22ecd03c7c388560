"""Liveness, readiness and Prometheus metrics.

/readyz contract (for a load balancer): 200 while the hot path works, i.e. Redis answers
(`meter: ok`) and every supervised background task runs; 503 otherwise. The ledger (the
database) is reported separately and does not fail readiness: with the database down the meter
keeps answering from Redis, the journal waits in Redis, and the flusher catches up later; so
`{"ready": true, "meter": "ok", "ledger": "down"}` is a healthy-but-degraded 200.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from api.state import AppState, app_state

router = APIRouter(tags=["ops"])
log = logging.getLogger("tokenmeter.api")


@router.get("/healthz", summary="Liveness: answers without touching any store")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def _ping_redis(state: AppState) -> None:
    await state.rt.redis.ping()


async def _ping_database(state: AppState) -> None:
    async with state.rt.db.engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


@router.get("/readyz", summary="Readiness: the meter (Redis) and background tasks; the ledger reported apart")
async def readyz(state: AppState = Depends(app_state)) -> JSONResponse:
    timeout = state.rt.settings.readyz_timeout_s
    body: dict[str, object] = {}
    errors: dict[str, str] = {}
    for name, check in (("meter", _ping_redis), ("ledger", _ping_database)):
        try:
            await asyncio.wait_for(check(state), timeout)
            body[name] = "ok"
        except Exception as exc:
            body[name] = "down"
            errors[name] = f"{type(exc).__name__}: {exc}"[:200]
    background = state.background
    tasks_ok = background is None or background.healthy
    if background is not None:
        body.update(background.status())
    ready = body["meter"] == "ok" and tasks_ok
    if errors:
        body["errors"] = errors
    return JSONResponse(status_code=200 if ready else 503, content={"ready": ready, **body})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(state: AppState = Depends(app_state)) -> Response:
    # The journal backlog from Redis (cached a second): right whichever process flushes.
    monitor = getattr(state.background, "backlog", None)
    if monitor is not None:
        try:
            await asyncio.wait_for(monitor.refresh(), state.rt.settings.readyz_timeout_s)
        except Exception as exc:  # Redis down: the last values stay; the scrape still answers
            log.debug("backlog gauges not refreshed: %s", exc)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
