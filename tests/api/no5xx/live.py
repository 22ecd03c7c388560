"""The real app (create_app via running_app, with its lifespan: Redis, the database, the
in-process flusher and the hold sweeper) held open on an event loop in a background thread, with
the real ids and credentials the generators swap in."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import text

from api.settings import Settings
from meter import CREDIT_KINDS, default_catalog
from persistence.models import Base
from tests.api.conftest import Api, make_settings, running_app
from tests.api.no5xx.asgi import REQUEST_TIMEOUT_S, Reply, Req, asgi_call
from tests.api.no5xx.schema import operations
from tests.conftest import _in_thread

# -- the app, live on its own loop ------------------------------------------------------------------

ACCOUNTS = ("fuzz-1", "fuzz-2")  # the pro plan, the free plan
USER_PASSWORD = "fuzz-password-1"


@dataclass
class Known:
    """Real ids and credentials the generators swap in, so requests get past the 404s."""

    accounts: list[str]
    user_id: str
    user_auth: str
    meter_key: str
    values: dict[str, list[Any]] = field(default_factory=dict)
    orders: list[dict[str, Any]] = field(default_factory=list)  # the user's pending purchases
    sign: Callable[[str, bytes], dict[str, str]] | None = None  # provider, body -> signature header


class Live:
    """running_app(settings) held open on an event loop in a thread; calls run on that loop."""

    def __init__(self, settings: Settings, accounts: tuple[str, ...], database: str = "sqlite") -> None:
        self.settings = settings
        self.database = database
        self.accounts = accounts
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.api: Api | None = None
        self.known: Known | None = None
        self.failed: BaseException | None = None
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._serve(),),
                                       name="fuzz-app", daemon=True)

    async def _serve(self) -> None:
        self.stop = asyncio.Event()
        try:
            async with running_app(self.settings) as api:
                self.known = await self._prepare(api)
                self.api = api
                self.ready.set()
                await self.stop.wait()
        except BaseException as exc:
            self.failed = exc
        finally:
            self.ready.set()

    async def _prepare(self, api: Api) -> Known:
        svc = api.service()
        for account_id, plan in zip(self.accounts, ("pro", "free"), strict=True):
            r = await api.client.post("/api/v1/meter/accounts", json={"account_id": account_id, "plan": plan},
                                      headers=svc)
            assert r.status_code in (200, 201), r.text
        email = f"fuzz-{uuid.uuid4().hex[:6]}@example.com"
        user_id, auth = await api.register(email, USER_PASSWORD)
        r = await api.client.post(f"/api/v1/admin/accounts/{user_id}/grants", headers=svc,
                                  json={"tokens": 1_000_000, "bucket": "premium", "reason": "fuzzing budget"})
        assert r.status_code == 200, r.text
        r = await api.client.post("/api/v1/projects", json={"title": "fuzzed project"}, headers=auth)
        assert r.status_code == 201, r.text
        project_id = r.json()["id"]
        keys = []
        for name in ("fuzz-meter-only", "fuzz-victim"):
            r = await api.client.post("/api/v1/admin/api-keys", json={"name": name, "scopes": ["meter"]},
                                      headers=svc)
            assert r.status_code == 201, r.text
            keys.append(r.json())
        orders = []
        if "POST /api/v1/tokens/purchase" in operations():
            for pack in ("starter", "pro", "unlimited"):
                r = await api.client.post("/api/v1/tokens/purchase", json={"package_id": pack}, headers=auth)
                assert r.status_code == 201, r.text
                orders.append(r.json())
        catalog = default_catalog()
        accounts = [*self.accounts, user_id]
        values: dict[str, list[Any]] = {
            "account_id": accounts, "email": [email, email.upper()], "password": [USER_PASSWORD],
            "promo_code": [*catalog.promo_codes, "welcome2024 ", "NOPE"], "plan": list(catalog.plans),
            "agent": list(catalog.agents), "model": list(catalog.models), "bucket": ["bonus", "premium"],
            "kind": list(CREDIT_KINDS), "scopes": [["meter"], ["admin"], ["meter", "admin"]],
            "tokens": [1, 10, 100, 8_192, 8_193], "actual_tokens": [0, 1, 100, 10_000],
            "ttl_ms": [1, 1_000, 60_000], "project_id": [project_id], "key_id": [keys[1]["id"]],
            "package_id": ["starter", "pro", "unlimited"], "title": ["a project"], "reason": ["fuzz"],
            "name": ["gw"], "when": ["now", "next"], "hold_id": ["1", "999999"],
            "code": [*catalog.promo_codes, "FUZZ_CODE"], "bonus_tokens": [1, 1_000], "max_redemptions": [1, 2],
            "input_tokens": [0, 10, 1_000], "output_tokens": [0, 10, 1_000], "provider_name": ["test", "razorpay"],
            "purchase_id": [o["purchase_id"] for o in orders] or ["none"],
        }
        return Known(accounts, user_id, auth["Authorization"], keys[0]["key"], values, orders, _signer(api))

    def start(self) -> Live:
        self.thread.start()
        self.ready.wait(120)
        if self.api is None:
            raise RuntimeError(f"the app did not start: {self.failed!r}") from self.failed
        return self

    def run(self, coro: Any, timeout: float = REQUEST_TIMEOUT_S + 20) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, req: Req) -> Reply:
        assert self.api is not None
        return self.run(asgi_call(self.api.app, req))

    def fresh_hold(self, account_id: str) -> str | None:
        """A live hold on the account (None if it cannot hold more now)."""
        assert self.api is not None
        decision = self.run(self.api.state.rt.meter.reserve(account_id, 50))
        return decision.hold_id if decision.allowed else None

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(60)
        if not self.thread.is_alive():
            self.loop.close()


def _signer(api: Api) -> Callable[[str, bytes], dict[str, str]] | None:
    """Signs a payment provider's webhook body the way the provider would (None: no payments)."""
    try:
        from api.payments import sign
        from api.state import payments_of
    except ImportError:
        return None

    def signed(provider_name: str, body: bytes) -> dict[str, str]:
        provider = payments_of(api.app).get(provider_name)
        secret = getattr(provider, "secret", None) or getattr(provider, "webhook_secret", None)
        if provider is None or not secret:
            return {}
        return {provider.signature_header.lower(): sign(secret, body)}

    return signed


@contextlib.contextmanager
def live_app(request: pytest.FixtureRequest, tmp_path: Any, accounts: tuple[str, ...] = ACCOUNTS,
             database: str = "sqlite") -> Iterator[Live]:
    """The app on a SQLite file, or on the run's Postgres database (tests/conftest.py's
    pg_database) emptied before and after: the fuzzing leaves junk behind and disables promo
    codes, which the next app start seeds again."""
    with contextlib.ExitStack() as stack:
        overrides = {}
        if database == "postgres":
            url = request.getfixturevalue("pg_database")
            stack.enter_context(emptied(url))
            overrides["database_url"] = url
        live = Live(make_settings(tmp_path, **overrides), accounts, database).start()
        stack.callback(live.close)
        yield live


@contextlib.contextmanager
def emptied(url: str) -> Iterator[None]:
    """Every table of the database truncated now and again on the way out (the schema stays)."""
    from persistence.db import Database

    async def truncate() -> None:
        db = Database(url)
        try:
            async with db.engine.begin() as conn:
                tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
                await conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY"))
        finally:
            await db.close()

    _in_thread(truncate)
    try:
        yield
    finally:
        _in_thread(truncate)
