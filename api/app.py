"""The FastAPI application: `create_app(settings)`; the lifespan owns Redis, the database and the
supervised background work (in-process flusher, hold sweep: api/background.py)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from sqlalchemy import select, update

from api.background import Background
from api.body_limit import BodySizeLimit
from api.dashboard import install_dashboard
from api.errors import install_error_handlers
from api.fastpath import MeterFastPath
from api.headers import PrivateHeaders
from api.plan_billing import enforce_paid_periods
from api.runtime import Runtime
from api.settings import Settings
from api.state import AppState
from persistence import migrate
from persistence.models import PromoCode

__all__ = ["create_app"]

log = logging.getLogger("tokenmeter.api")


async def _seed_promo_codes(rt: Runtime) -> None:
    """The catalog's public codes, each capped at TOKENMETER_PUBLIC_PROMO_MAX_REDEMPTIONS (0 = none)."""
    cap = rt.settings.public_promo_max_redemptions or None
    async with rt.db.sessions() as session, session.begin():
        known = set((await session.execute(select(PromoCode.code))).scalars())
        for code, promo in rt.catalog.promo_codes.items():
            if code not in known:
                session.add(PromoCode(code=code, bonus_tokens=promo.bonus_tokens, redemptions=0, active=True,
                                      max_redemptions=cap))
        await session.execute(update(PromoCode).where(PromoCode.code.in_(list(rt.catalog.promo_codes))).values(
            max_redemptions=cap))


async def _plan_sweep(rt: Runtime) -> None:
    """Paid plans against the months paid for (api/plan_billing.py), as a scheduled job."""
    await enforce_paid_periods(rt)


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
        # The in-process flusher and the periodic jobs, supervised (api/background.py).
        state.background = Background.for_app(rt, settings)
        state.background.every("plan_period_sweep", settings.plan_period_sweep_s, lambda: _plan_sweep(rt))
        await state.background.start()
        # Everything built so far (app, routes, models, pools) lives as long as the process:
        # out of the cyclic collector's sight, a full collection no longer walks it, which took
        # the long pauses out of the debit's tail latency.
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()  # (several apps in one process, as in the tests: collect as usual again)
            await state.background.stop()
            await asyncio.gather(*state.tasks, return_exceptions=True)
            state.auth.close()
            if state.proxy is not None:
                await state.proxy.close()
            await rt.close()

    app = FastAPI(
        title="tokenmeter",
        version="0.1.0",
        description="Token meter and rate limiter for AI app-builder platforms: atomic debits, "
                    "holds, monthly allowances with rollover, packs, promo codes.",
        lifespan=lifespan,
        redirect_slashes=False,  # Starlette builds that redirect's Location from the Host header
    )
    from api.routes import admin, auth, gateway, meter, ops, plans, projects, proxy, purchases, tokens, usage

    install_error_handlers(app)
    app.add_middleware(PrivateHeaders)  # nosniff, no-store; inside the fast path, which adds its own
    app.add_middleware(MeterFastPath)  # POST /api/v1/meter/debit without the framework's per-request work
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes,  # added last = outermost
                       larger={"/api/v1/gateway/settle": gateway.MAX_USAGE_BODY,  # a whole completion
                               "/api/v1/meter/usage": usage.MAX_BODY_BYTES,  # 1,000 events
                               "/llm/": settings.proxy_max_body_bytes})  # prompts, images

    app.include_router(ops.router)
    app.include_router(meter.router)  # the hot path first: routes are matched in order
    app.include_router(gateway.router)
    app.include_router(usage.router)
    app.include_router(auth.router)
    app.include_router(tokens.router)
    app.include_router(purchases.router)
    app.include_router(projects.router)
    app.include_router(plans.router)
    app.include_router(admin.router)
    if settings.proxy_enabled:  # the metering proxy: only for the upstreams configured
        app.include_router(proxy.build_router(settings))
    install_dashboard(app)  # `/` and `/static`: after every API route, which are matched first
    return app
