"""The server side of loadtests/bench_http.py (it runs in the subprocess the benchmark starts):
the service's own app, plus two bare endpoints that parse the debit's body and answer a fixed
JSON of the debit response's size, so the run measures what the meter call itself costs.

* `POST /bare`: a FastAPI route (its own router, included like the service's routers).
* `POST /bare-asgi`: served as pure ASGI ahead of the framework with the fast path's own body
  reader and JSON sender (api/fastpath.py), the way the debit is served.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.fastpath import _body
from api.routes.meter import DebitIn
from meter._http import send_json

MASTER_KEY = "tmbench-http-master-key"  # fixed: this server only lives for the run, on loopback
SETTINGS_ENV = "TOKENMETER_BENCH_HTTP_SETTINGS"  # JSON of Settings(...) kwargs, for every worker
DEBIT_PATH = "/api/v1/meter/debit"
BARE_PATH = "/bare"
BARE_ASGI_PATH = "/bare-asgi"
# The debit response's keys with values of the same size: the same size class on the wire.
BARE_BODY: dict[str, object] = {
    "allowed": True, "remaining_tokens": 999_999_999_876_543, "requests_today": 12_345,
    "daily_request_limit": 0, "transaction_id": "bench-123:45678", "replayed": False,
    "reserved_tokens": 0, "tokens_used_today": 12_345,
}

CATALOG_TOML = """\
# tokenmeter catalog for loadtests/bench_http.py: one plan without a daily cap.
inr_paise_per_usd = 8300

[plans.bench]
name = "Bench"
monthly_tokens = 1_000_000_000_000_000   # never runs dry within a run
price_inr_paise = 0
daily_requests = 0                       # 0 = unlimited
requests_per_minute = 0                  # off
max_tokens_per_request = 8_192
rollover_pct = 50

[packs.bench]
name = "Bench Pack"
tokens = 1_000
price_inr_paise = 100

[promo_codes.BENCH]
bonus_tokens = 1

[agents.idea]
name = "IdeaAgent"
estimate_tokens = 2_000
model = "haiku"

[models.haiku]
name = "Claude Haiku"
input_usd_micros_per_mtok = 250_000
output_usd_micros_per_mtok = 1_250_000
"""


bare_router = APIRouter()


@bare_router.post(BARE_PATH, include_in_schema=False)
async def bare(body: DebitIn) -> JSONResponse:  # DebitIn at module level: the annotation is a string
    return JSONResponse(BARE_BODY)


def bench_app() -> Any:
    """uvicorn factory: the service's app plus the bare endpoints, settings from SETTINGS_ENV."""
    from api.app import create_app
    from api.settings import Settings

    app = create_app(Settings(**json.loads(os.environ[SETTINGS_ENV])))
    app.include_router(bare_router)
    app.add_middleware(BareAsgi)
    return app


class BareAsgi:
    """`POST /bare-asgi`: the fast path's body read and JSON answer without the meter call."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != BARE_ASGI_PATH:
            await self.app(scope, receive, send)
            return
        raw = await _body(receive)
        if raw is None:
            return
        DebitIn.model_validate_json(raw)
        await send_json(send, 200, BARE_BODY, [])


async def _prepare(settings_kwargs: dict[str, Any]) -> None:
    """Migrate and seed once, before the workers start (N workers would race on SQLite)."""
    from api.app import _seed_promo_codes
    from api.runtime import Runtime
    from api.settings import Settings
    from persistence import migrate

    rt = await Runtime.start(Settings(**settings_kwargs))
    try:
        await migrate.upgrade(rt.db)
        await _seed_promo_codes(rt)
    finally:
        await rt.close()


def serve(args: argparse.Namespace) -> None:
    """`--serve`: run the service with `POST /bare` on 127.0.0.1:port until SIGTERM."""
    import uvicorn

    kwargs: dict[str, Any] = {
        "redis_url": args.redis_url, "database_url": args.database_url, "catalog": args.catalog,
        "key_prefix": args.prefix, "master_key": MASTER_KEY, "flusher": args.flusher,
    }
    asyncio.run(_prepare(kwargs))
    os.environ[SETTINGS_ENV] = json.dumps({**kwargs, "migrate_on_start": False})
    uvicorn.run("loadtests.bench_http_app:bench_app", factory=True, host="127.0.0.1", port=args.port,
                workers=args.workers, loop="uvloop", http="httptools", access_log=False, log_level="warning")
