"""The FastAPI application: `create_app(settings)`; the lifespan owns Redis, the database, the
in-process flusher and the hold sweeper."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from sqlalchemy import select

from api.body_limit import BodySizeLimit
from api.errors import install_error_handlers
from api.fastpath import MeterFastPath
from api.runtime import Runtime
from api.settings import Settings
from api.state import AppState
from meter import keys as keyspace
from persistence import migrate
from persistence.models import PromoCode

__all__ = ["create_app"]

log = logging.getLogger("tokenmeter.api")


async def _seed_promo_codes(rt: Runtime) -> None:
    async with rt.db.sessions() as session, session.begin():
        known = set((await session.execute(select(PromoCode.code))).scalars())
        for code, promo in rt.catalog.promo_codes.items():
            if code not in known:
                session.add(PromoCode(code=code, bonus_tokens=promo.bonus_tokens, redemptions=0, active=True))


async def _sweep_holds(rt: Runtime, stop: asyncio.Event, every_s: float = 5.0) -> None:
    """Release expired holds of accounts nobody touches (the lazy release covers the rest)."""
    while not stop.is_set():
        try:
            now = rt.meter.clock.now_ms()
            for shard in range(rt.settings.shards):
                due = await rt.redis.zrangebyscore(keyspace.sweep_key(shard, rt.settings.key_prefix),
                                                   "-inf", now, start=0, num=100)
                for account_id in due:
                    await rt.meter.sweep_account(account_id)
        except Exception as exc:  # keep sweeping after a Redis hiccup
            log.warning("hold sweep failed: %s", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt = await Runtime.start(settings)
        if settings.migrate_on_start:
            await migrate.upgrade(rt.db)
        await _seed_promo_codes(rt)
        state = AppState.build(rt)
        app.state.tm = state
        stop = asyncio.Event()
        if settings.flusher == "inprocess":
            state.tasks.append(asyncio.create_task(rt.flusher(consumer="inprocess").run(stop)))
        state.tasks.append(asyncio.create_task(_sweep_holds(rt, stop)))
        # Everything built so far (app, routes, models, pools) lives as long as the process:
        # out of the cyclic collector's sight, a full collection no longer walks it, which took
        # the long pauses out of the debit's tail latency.
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()  # (several apps in one process, as in the tests: collect as usual again)
            stop.set()
            await asyncio.gather(*state.tasks, return_exceptions=True)
            await rt.close()

    app = FastAPI(
        title="tokenmeter",
        version="0.1.0",
        description="Token meter and rate limiter for AI app-builder platforms: atomic debits, "
                    "holds, monthly allowances with rollover, packs, promo codes.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(MeterFastPath)  # POST /api/v1/meter/debit without the framework's per-request work
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)  # added last = outermost
    from api.routes import admin, auth, meter, ops, plans, projects, purchases, tokens

    app.include_router(ops.router)
    app.include_router(meter.router)  # the hot path first: routes are matched in order
    app.include_router(auth.router)
    app.include_router(tokens.router)
    app.include_router(purchases.router)
    app.include_router(projects.router)
    app.include_router(plans.router)
    app.include_router(admin.router)
    return app
