"""No input produces a 5xx: property-based fuzzing of every operation in the app's OpenAPI schema.

The guarantee: bad input gets a clear 4xx naming the problem (a JSON body with "error" and
"message", and on a 422 a "field" the request has) and changes nothing. No input produces a 5xx.
A 503 is allowed only when the store is really down, and here it is not.

How it runs: the real app (create_app via running_app, with its lifespan: Redis, the database,
the in-process flusher and the hold sweeper) serves on an event loop in a background thread,
once on SQLite and once on a Postgres database of its own (when Postgres is reachable).
Hypothesis drives it from the test thread through raw ASGI calls, so any bytes and headers can
be sent, an event stream can be cut after its first event, and an exception the app raises is
caught with the project frames it passed through. For every operation in the schema:
  * schemathesis cases, positive and negative, generated from the app's own OpenAPI schema;
  * junk made here: broken JSON, wrong types, 2**64, floats, NaN, lone surrogates, NUL, empty
    and huge strings, missing and extra fields, odd content types, headers and paths;
  * a deterministic sweep: each input in turn through the edge values of its type;
  * requests without valid credentials (none, wrong kind, forged, under-scoped): 401/403;
  * payment events signed with the provider's secret, so they get past the signature check;
  * "changes nothing": Redis and the database are compared around every 4xx.
Most requests authenticate properly (the master service key, a meter-only key, or a registered
user's JWT), so they reach the handlers. Ids are often swapped for real ones (accounts fuzz-1 and
fuzz-2, the user's account, a live hold, the user's project and orders, a key to revoke, real
promo codes, plans, agents and models), so the deeper paths of the handlers run and not only
their 404s.

Failures are collected, not raised mid-run. Each test ends by listing every distinct fault with
its shortest reproduction (method, path, headers, body, and the response or the exception).
The narrow regression tests at the end pin each fault the fuzzing found.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import traceback
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from sqlalchemy import select

from api.app import create_app
from api.security import issue_token
from api.settings import Settings
from meter import CREDIT_KINDS, default_catalog
from persistence.models import Base
from tests.api.conftest import MASTER_KEY, Api, make_settings, running_app
from tests.conftest import DATABASES, PG_ADMIN_URL, REAL_PG

pytestmark = [pytest.mark.redis, pytest.mark.slow]

# Examples on SQLite; on Postgres a share of them (its own faults are mostly the edge values',
# which every run sweeps in full). The file takes about a minute on two busy cores.
EXAMPLES = 20  # schemathesis cases per operation
JUNK_EXAMPLES = 15  # hand-made junk requests per operation
AUTH_EXAMPLES = 4  # unauthenticated or wrongly authenticated requests per protected operation
QUIET_EXAMPLES = 80  # requests in the "a rejected request changes nothing" run
POSTGRES_SHARE = 0.4
REQUEST_TIMEOUT_S = 10.0
HOST = "tokenmeter.test"

# -- the schema (built without starting anything) ------------------------------------------------

OPENAPI: dict[str, Any] = create_app(Settings(master_key=MASTER_KEY, jwt_secret="schema-only")).openapi()
SCHEMA = schemathesis.openapi.from_dict(OPENAPI)
OPERATIONS = {op.label: op for op in (result.ok() for result in SCHEMA.get_all_operations())}


def _spec(label: str) -> dict[str, Any]:
    method, path = label.split(" ", 1)
    spec: dict[str, Any] = OPENAPI["paths"][path][method.lower()]
    return spec


def _params(label: str, where: str) -> list[dict[str, Any]]:
    return [p for p in _spec(label).get("parameters", []) if p["in"] == where]


def auth_kind(label: str) -> str:
    """service (service key: `X-API-Key` or bearer), user (bearer JWT) or public, from the schema."""
    headers = {p["name"].lower() for p in _params(label, "header")}
    if "x-api-key" in headers:
        return "service"
    return "user" if "authorization" in headers else "public"


def needs_admin(label: str) -> bool:
    return "admin" in _spec(label).get("tags", [])


def body_schema(label: str) -> dict[str, Any] | None:
    content = _spec(label).get("requestBody", {}).get("content", {})
    schema = content.get("application/json", {}).get("schema")
    if schema is None:
        return None
    while "$ref" in schema:
        schema = OPENAPI["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return dict(schema)


PROTECTED = sorted(label for label in OPERATIONS if auth_kind(label) != "public")
WITH_INPUT = sorted(label for label in OPERATIONS
                    if body_schema(label) is not None or _spec(label).get("parameters"))
MUTATING = sorted(label for label in OPERATIONS if label.split(" ", 1)[0] in ("POST", "PUT", "PATCH", "DELETE"))

# -- requests and replies ------------------------------------------------------------------------

NOISE_HEADERS = {"user-agent", "accept-encoding", "accept", "connection", "x-schemathesis-testcaseid",
                 "content-length"}


@dataclass
class Req:
    method: str
    url: str  # path and query, percent-encoded
    headers: dict[str, str]  # lower-case names, latin-1 values
    body: bytes = b""

    def show(self) -> str:
        headers = {k: v for k, v in self.headers.items() if k not in NOISE_HEADERS}
        body = self.body if len(self.body) <= 600 else self.body[:600] + b"...(%d bytes)" % len(self.body)
        return f"{self.method} {_cut(self.url, 400)}\n  headers: {headers}\n  body: {body!r}"


@dataclass
class Reply:
    status: int | None
    headers: dict[str, str]
    body: bytes
    error: str | None = None  # where an exception the app raised came from, or a hang
    raised: str = ""  # that exception in one line

    def json(self) -> Any:
        return json.loads(self.body)

    def show(self) -> str:
        if self.error:
            return f"-> {self.status or 'no response'}; the app raised:\n{_indent(self.error)}"
        return f"-> {self.status} {_cut(self.body.decode('utf-8', 'replace'), 600)}"


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n] + f"...({len(text)} chars)"


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines())


async def asgi_call(app: Any, req: Req, timeout: float = REQUEST_TIMEOUT_S) -> Reply:
    """One request straight into the ASGI app, the way a server would send it. An event stream
    is cut after its first chunk. An exception the app raises (after its 500) is returned with
    its traceback, and so is a request that gets no complete response in time."""
    split = urllib.parse.urlsplit(req.url)
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": req.method, "scheme": "http", "root_path": "",
        "path": urllib.parse.unquote(split.path), "raw_path": split.path.encode("latin-1"),
        "query_string": split.query.encode("latin-1"),
        "headers": [(b"host", HOST.encode()), *((k.encode("latin-1"), v.encode("latin-1"))
                                                for k, v in req.headers.items())],
        "client": ("127.0.0.1", 40000), "server": (HOST, 80),
    }
    done = asyncio.Event()
    sent = False
    status: int | None = None
    headers: dict[str, str] = {}
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": req.body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            headers.update((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            streaming = headers.get("content-type", "").startswith("text/event-stream")
            if not message.get("more_body", False) or (streaming and chunks[-1]):
                done.set()  # an event stream never ends: its first event is enough

    task = asyncio.ensure_future(app(scope, receive, send))
    waiter = asyncio.ensure_future(done.wait())
    await asyncio.wait({task, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    error, raised = None, ""
    if task.done():
        exc = task.exception()
        if exc is not None:
            error = where_raised(exc)
            raised = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    elif done.is_set():  # a cut stream: the app sees the disconnect and stops
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(task, 2)
    else:
        error = raised = f"no complete response within {timeout} s (status {status})"
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
    waiter.cancel()
    return Reply(status, headers, b"".join(chunks), error, raised)


ROOT = str(Path(__file__).resolve().parents[2]) + "/"


def where_raised(exc: BaseException) -> str:
    """The exception and the project's own frames it passed through (not the libraries')."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if f.filename.startswith(ROOT) and "site-packages" not in f.filename]
    lines = [f"{f.filename.removeprefix(ROOT)}:{f.lineno} in {f.name}: {(f.line or '').strip()}" for f in frames[-5:]]
    return "\n".join([*lines, f"{type(exc).__name__}: {_cut(str(exc), 700)}"])


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
        if "POST /api/v1/tokens/purchase" in OPERATIONS:
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
        from api.payments import payments_of, sign
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
def live_app(tmp_path: Any, accounts: tuple[str, ...] = ACCOUNTS, database: str = "sqlite") -> Iterator[Live]:
    """The app on a SQLite file, or on a Postgres database of its own (the fuzzing leaves junk
    behind and disables promo codes, so it does not share the run's database)."""
    with contextlib.ExitStack() as stack:
        overrides = {"database_url": stack.enter_context(private_pg_database())} if database == "postgres" else {}
        live = Live(make_settings(tmp_path, **overrides), accounts, database).start()
        stack.callback(live.close)
        yield live


@contextlib.contextmanager
def private_pg_database() -> Iterator[str]:
    import asyncpg

    if not REAL_PG:
        pytest.skip("PostgreSQL not reachable (local run only: with CI=true the session stops instead)")
    name = f"tmfuzz_{uuid.uuid4().hex[:10]}"

    def admin(sql: str) -> None:
        async def run() -> None:
            conn = await asyncpg.connect(PG_ADMIN_URL)
            try:
                await conn.execute(sql)
            finally:
                await conn.close()

        with ThreadPoolExecutor(1) as pool:  # its own loop, whatever loop the caller runs
            pool.submit(asyncio.run, run()).result()

    admin(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module", params=DATABASES)
def live(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with live_app(tmp_path_factory.mktemp("fuzz"), database=request.param) as app:
        yield app


# -- what every reply must satisfy --------------------------------------------------------------------


def problem(req: Req, reply: Reply, *, refused: bool = False, label: str | None = None) -> str | None:
    """What is wrong with this reply, or None. `refused`: the caller had no valid credentials."""
    if reply.error is not None:
        kind = "unhandled" if reply.status is None or reply.status >= 500 else "raised after the response"
        return f"{kind}: {_cut(reply.raised, 300)}"
    assert reply.status is not None
    if reply.status >= 500:
        return f"{reply.status}: {_cut(reply.body.decode('utf-8', 'replace'), 200)}"
    if refused and reply.status not in (401, 403) and not (reply.status in (400, 422) and not _is_json(req.body)):
        # (a body that is not JSON at all is refused while it is read, before credentials are looked at)
        return f"no valid credentials, yet {reply.status} (want 401 or 403)"
    if 400 <= reply.status < 500:
        try:
            body = reply.json()
        except ValueError:
            return f"{reply.status} without a JSON body"
        if not isinstance(body, dict):
            return f"{reply.status} with a JSON {type(body).__name__}, not an object"
        for key in ("error", "message"):
            if not isinstance(body.get(key), str) or not body[key]:
                return f"{reply.status} body lacks a non-empty {key!r}: keys {sorted(body)}"
        if reply.status == 422:
            named = body.get("field")
            if not isinstance(named, str):
                return f"422 does not name the field: {body}"
            known_op = label in OPERATIONS  # (not for a concrete path, as in the regression tests)
            undeclared_body = known_op and body_schema(str(label)) is None and bool(req.body)
            if known_op and not undeclared_body and named.split(".")[0].lower() not in request_fields(str(label)):
                return (f"422 names a field the request does not have: {named!r} is not one of "
                        f"{sorted(request_fields(label))}; message: {body.get('message')}")
    return None


def request_fields(label: str) -> set[str]:
    """What a 422 may name: the body ("body"), its properties, and the operation's parameters
    (lower-cased: header names are case-insensitive)."""
    names = {"body", *(body_schema(label) or {}).get("properties", {})}
    return {n.lower() for n in names | {p["name"] for p in _spec(label).get("parameters", [])}}


def _is_json(body: bytes) -> bool:
    try:
        json.loads(body)
    except (ValueError, RecursionError):
        return False
    return True


class Findings:
    """Distinct faults, each with its shortest reproduction."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], tuple[str, Req, Reply]] = {}
        self.requests = 0

    def check(self, label: str, req: Req, reply: Reply, *, refused: bool = False) -> str | None:
        self.requests += 1
        what = problem(req, reply, refused=refused, label=label)
        if what is not None:
            self.add(label, what, req, reply)
        return what

    def add(self, label: str, what: str, req: Req, reply: Reply) -> None:
        parts = what.split(":")
        kind = parts[0]
        if kind in ("unhandled", "raised after the response"):  # by exception and message, not values
            kind = re.sub(r"\d+|'[^']*'", "_", what)[:150]
        elif "changed state" in kind:
            kind = "changed state"
        elif kind.startswith("422 names a field"):  # grouped by what went wrong, not the value
            kind = "422 names a field the request does not have: " + what.rsplit(": ", 1)[-1][:60]
        key = (label, kind[:100])  # one entry per operation and kind of fault
        prior = self.seen.get(key)
        if prior is None or len(req.show()) < len(prior[1].show()):
            self.seen[key] = (what, req, reply)

    def report(self) -> str:
        parts = [f"{len(self.seen)} distinct fault(s) in {self.requests} requests:"]
        for (label, _), (what, req, reply) in sorted(self.seen.items()):
            parts.append(f"\n[{label}] {what}\n{req.show()}\n{reply.show()}")
        return "\n".join(parts)

    def assert_none(self) -> None:
        if self.seen:
            pytest.fail(self.report(), pytrace=False)


# -- building requests ----------------------------------------------------------------------------

BASE_URL = f"http://{HOST}"
CREDENTIAL_HEADERS = ("authorization", "x-api-key")


def case_request(case: Any) -> Req | None:
    """The exact request schemathesis would send for the case (None if it cannot be encoded)."""
    kw = case.as_transport_kwargs(base_url=BASE_URL)
    allowed = {k: kw[k] for k in ("method", "url", "headers", "params", "data", "json", "cookies", "files")
               if k in kw}
    try:
        prepared = requests.Request(**allowed).prepare()
        headers = {k.lower(): (v.decode("latin-1") if isinstance(v, bytes) else str(v))
                   for k, v in prepared.headers.items()}
        for v in headers.values():
            v.encode("latin-1")
    except (ValueError, TypeError, UnicodeError):
        return None
    split = urllib.parse.urlsplit(prepared.url or "")
    url = split.path + (f"?{split.query}" if split.query else "")
    body = prepared.body or b""
    return Req(prepared.method or case.method, url, headers, body.encode() if isinstance(body, str) else body)


def bad_credentials(label: str, known: Known) -> st.SearchStrategy[dict[str, str | None]]:
    """Credential headers that must be refused (401/403) for a protected operation."""
    wrong_kind = (f"Bearer {MASTER_KEY}" if auth_kind(label) == "user" else known.user_auth)
    options: list[dict[str, str | None]] = [
        {"authorization": None, "x-api-key": None},
        {"authorization": wrong_kind, "x-api-key": None},
        {"authorization": "Bearer ", "x-api-key": None},
        {"authorization": "Basic " + MASTER_KEY, "x-api-key": None},
        {"authorization": "Bearer tmk_nope_nope", "x-api-key": None},
        {"authorization": "Bearer " + known.user_auth.split(" ", 1)[1][:-3] + "abc", "x-api-key": None},
        {"authorization": "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJmdXp6LTEiLCJleHAiOjk5OTk5OTk5OTl9.",
         "x-api-key": None},
        {"authorization": None, "x-api-key": MASTER_KEY + "x"},
    ]
    if needs_admin(label):
        options += [{"authorization": f"Bearer {known.meter_key}", "x-api-key": None},
                    {"authorization": None, "x-api-key": known.meter_key}]
    garbage = st.builds(lambda a, k: {"authorization": a, "x-api-key": k},
                        st.one_of(st.none(), LATIN1_TEXT, LATIN1_TEXT.map("Bearer {}".format)),
                        st.one_of(st.none(), LATIN1_TEXT))
    return st.one_of(st.sampled_from(options), garbage)


def good_credentials(label: str, known: Known) -> st.SearchStrategy[dict[str, str | None]]:
    kind = auth_kind(label)
    if kind == "public":
        return st.just({})
    if kind == "user":
        return st.just({"authorization": known.user_auth, "x-api-key": None})
    options: list[dict[str, str | None]] = [{"authorization": f"Bearer {MASTER_KEY}"}, {"x-api-key": MASTER_KEY,
                                                                                        "authorization": None}]
    if not needs_admin(label):
        options.append({"authorization": None, "x-api-key": known.meter_key})
    return st.sampled_from(options)


def with_headers(req: Req, changes: dict[str, str | None]) -> Req:
    headers = dict(req.headers)
    for name, value in changes.items():
        if value is None:
            headers.pop(name, None)
        else:
            headers[name] = value
    return Req(req.method, req.url, headers, req.body)


def steer(case: Any, draw: st.DrawFn, live: Live) -> None:
    """Often swap generated ids and values for real ones, so handlers get past their 404s."""
    assert live.known is not None
    values = live.known.values
    body = case.body
    if isinstance(body, dict) and draw(st.integers(0, 2), label="steer body") > 0:
        body = dict(body)
        for name, value in list(body.items()):
            if name in values and isinstance(value, str | int | list) and draw(st.integers(0, 3)) > 0:
                body[name] = draw(st.sampled_from(values[name]), label=f"body.{name}")
        account = body.get("account_id")
        if "hold_id" in body and account in live.known.accounts and draw(st.booleans(), label="live hold"):
            body["hold_id"] = live.fresh_hold(account) or "1"
        case.body = body
    for name in list(case.path_parameters or {}):
        if name in values and draw(st.booleans(), label=f"steer path {name}"):
            case.path_parameters[name] = draw(st.sampled_from(values[name]))
    if case.headers and "idempotency-key" in case.headers and draw(st.booleans(), label="steer idem"):
        case.headers["idempotency-key"] = draw(st.sampled_from(["fuzz-idem-1", "fuzz-idem-2"]))


# -- junk --------------------------------------------------------------------------------------------

LATIN1_TEXT = st.text(st.characters(max_codepoint=255, exclude_categories=("Cs",)), max_size=40)
ODD_STRINGS = ["", " ", "\x00", "nul\x00@example.com", "\ud800", "\udfff", "a\udc80b", "\t\n", "fuzz-1\n",
               " fuzz-1", "FUZZ-1", "a" * 10_000, "\U0001f980" * 40, "\u202eabc", "null", "true", "1e400", "-0",
               "0x10", "NaN", "%00", "../../etc/passwd", "'; DROP TABLE accounts; --", "9" * 16, "9" * 21, "0",
               "2024-13-45T99:99:99", "0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59-23:59", "\\u0000"]
ODD_INTS = [0, -1, 1, 2**31 - 1, 2**31, 2**53 - 1, 2**53, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**30, -(2**63),
            -(2**64), 10**4000]
ODD_FLOATS = [0.5, 1.0, -1.5, 1e308, -0.0, 5e-324, float("inf"), float("-inf"), float("nan")]

JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.sampled_from(ODD_INTS), st.integers(), st.sampled_from(ODD_FLOATS),
    st.floats(), st.sampled_from(ODD_STRINGS), st.text(max_size=30),
)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=8)


ODD_DATES = ["0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59-23:59", "2024-02-30T00:00:00Z", "1970-01-01",
             "2024-01-01T00:00:00.9999999999Z", "99999-01-01T00:00:00Z", "1700000000", "-1", "1e10",
             "99999999999999999999", "now", "2024-01-01T25:00:00", "2024-01-01 00:00:00+00:00", "T"]


def _kinds(schema: dict[str, Any]) -> set[str]:
    return {str(s.get("format") or s.get("type")) for s in schema.get("anyOf", [schema])}


def _plausible(name: str, schema: dict[str, Any], known: Known) -> st.SearchStrategy[Any]:
    kinds = _kinds(schema)
    options: list[st.SearchStrategy[Any]] = []
    if name in known.values:
        options.append(st.sampled_from(known.values[name]))
    if "integer" in kinds:
        options.append(st.integers(-10, 20_000))
    if "date-time" in kinds:
        options.append(st.datetimes().map(lambda d: d.isoformat() + "Z"))
    if "string" in kinds:
        options.append(st.text(max_size=12))
    if "array" in kinds:
        options.append(st.lists(st.text(max_size=8), max_size=3))
    return st.one_of(options) if options else JSON_VALUES


def _boundary(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Edge values of the field's own type: the likeliest to slip past validation."""
    kinds = _kinds(schema)
    options: list[st.SearchStrategy[Any]] = []
    if "integer" in kinds or "number" in kinds:
        options += [st.sampled_from(ODD_INTS), st.sampled_from(ODD_FLOATS)]
    if "date-time" in kinds:
        options.append(st.sampled_from(ODD_DATES))
    if "string" in kinds or "date-time" in kinds or not options:
        options.append(st.sampled_from(ODD_STRINGS))
    return st.one_of(options)


def _query_value(schema: dict[str, Any]) -> st.SearchStrategy[str]:
    kinds = _kinds(schema)
    options: list[st.SearchStrategy[str]] = [st.sampled_from(ODD_STRINGS), st.text(max_size=12)]
    if "integer" in kinds:
        options += [st.sampled_from([str(i) for i in ODD_INTS[:-1]]), st.integers(-5, 600).map(str)]
    if "date-time" in kinds:
        options += [st.sampled_from(ODD_DATES), st.datetimes().map(lambda d: d.isoformat())]
    return st.one_of(options)


@st.composite
def junk_body(draw: st.DrawFn, label: str, known: Known) -> tuple[bytes, str | None]:
    """(body bytes, content type): mostly an object shaped like the model with some fields bad,
    missing or extra; sometimes not an object at all, or not JSON."""
    schema = body_schema(label) or {}
    props: dict[str, Any] = schema.get("properties", {})
    shape = draw(st.sampled_from(["fields"] * 6 + ["raw", "value"]))
    if shape == "raw":
        raw = draw(st.one_of(
            st.sampled_from([b"", b"{", b'{"account_id":', b"{'a': 1}", b"[1,2", b"\xff\xfe\x00", b"\xef\xbb\xbf{}",
                             b"[" * 100_000, b"{}" * 3, b"1" * 5_000, b'"\\ud800"', b'{"a":"\\udfff"}',
                             b"NaN", b"Infinity", b"null", b"{}\x00"]),
            st.binary(max_size=64)))
    elif shape == "value":
        raw = json.dumps(draw(JSON_VALUES)).encode()
    else:
        obj: dict[str, Any] = {}
        for name, prop in props.items():
            choice = draw(st.sampled_from(["plausible"] * 3 + ["boundary"] * 2 + ["junk", "omit"]),
                          label=f"{name} is")
            if choice == "plausible":
                obj[name] = draw(_plausible(name, prop, known), label=name)
            elif choice == "boundary":
                obj[name] = draw(_boundary(prop), label=name)
            elif choice == "junk":
                obj[name] = draw(JSON_VALUES, label=name)
        for key in draw(st.lists(st.sampled_from(["extra", "", "__proto__", "Account_ID", "tokens "]), max_size=2)):
            obj[key] = draw(JSON_VALUES)
        raw = json.dumps(obj).encode()
        if draw(st.integers(0, 9)) == 0:  # a duplicate key, or trailing garbage
            raw = draw(st.sampled_from([raw[:-1] + b', "tokens": "x"}' if len(raw) > 2 else raw, raw + b"]"]))
    content_type = draw(st.sampled_from(["application/json"] * 6 + [
        None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
        "application/json; charset=utf-16", "application/merge-patch+json", "application/json\x01"]))
    return raw, content_type


@st.composite
def junk_request(draw: st.DrawFn, label: str, known: Known) -> Req:
    method, template = label.split(" ", 1)
    path = template
    for p in _params(label, "path"):
        name = p["name"]
        value = draw(st.one_of(st.sampled_from(known.values.get(name, ["x"])), st.sampled_from(ODD_STRINGS),
                               st.text(max_size=20)), label=f"path {name}")
        encoded = urllib.parse.quote(value.encode("utf-8", "surrogatepass"), safe="")
        path = path.replace("{" + name + "}", encoded or "%20")
    query: list[tuple[str, str]] = []
    for p in _params(label, "query"):
        if draw(st.booleans(), label=f"query {p['name']}?"):
            query.append((p["name"], draw(_query_value(p.get("schema", {})), label=f"query {p['name']}")))
    if draw(st.integers(0, 4)) == 0:
        query.append((draw(st.sampled_from(["limit", "cursor", "x", ""])), draw(st.sampled_from(ODD_STRINGS))))
    qs = urllib.parse.urlencode([(k, v.encode("utf-8", "surrogatepass")) for k, v in query])
    headers: dict[str, str] = {}
    creds = draw(good_credentials(label, known))
    headers.update({k: v for k, v in creds.items() if v is not None})
    if any(p["name"].lower() == "idempotency-key" for p in _params(label, "header")) and draw(st.booleans()):
        headers["idempotency-key"] = draw(st.one_of(
            st.sampled_from(["fuzz-idem-1", "", " ", "\x7f", "a\tb", "é" * 10, "k" * 255, "k" * 256, "k" * 10_000]),
            LATIN1_TEXT))
    body = b""
    if body_schema(label) is not None:
        body, content_type = draw(junk_body(label, known))
        if content_type is not None:
            headers["content-type"] = content_type
    return Req(method, path + (f"?{qs}" if qs else ""), headers, body)


# -- payment events: signed like the provider's, so they get past the signature check ----------------

PAYMENT_OPS = sorted(label for label in OPERATIONS if "payments" in _spec(label).get("tags", []))


@st.composite
def payment_event(draw: st.DrawFn, label: str, known: Known) -> Req:
    """A payment provider's event for one of the user's orders (or not), mostly well signed."""
    order = draw(st.sampled_from(known.orders)) if known.orders else {}
    plausible: dict[str, st.SearchStrategy[Any]] = {
        "order_id": st.sampled_from([o["order_id"] for o in known.orders] or ["order_x"]),
        "status": st.sampled_from(["paid", "paid", "failed", "refunded", "PAID", "captured"]),
        "amount": st.sampled_from([order.get("amount", 100), 1, 0]),
        "currency": st.sampled_from([order.get("currency", "INR"), "inr", "USD"]),
        "payment_id": st.sampled_from(["pay_1", "pay_2"]), "refund_id": st.sampled_from(["rfnd_1", "rfnd_2"]),
        "refunded_amount": st.sampled_from([1, order.get("amount", 100), 10**9]),
        "event_id": st.sampled_from(["evt_1", "evt_2"]),
    }
    event: dict[str, Any] = {}
    for name, values in plausible.items():
        choice = draw(st.sampled_from(["plausible"] * 3 + ["boundary", "omit"]), label=f"{name} is")
        if choice == "plausible":
            event[name] = draw(values, label=name)
        elif choice == "boundary":
            event[name] = draw(st.one_of(st.sampled_from(ODD_STRINGS), st.sampled_from(ODD_INTS), JSON_VALUES))
    raw = draw(st.one_of(st.just(json.dumps(event).encode()), st.just(json.dumps(event).encode()),
                         st.sampled_from([b"", b"{", b"[]", b"null", b"\xff"])), label="body")
    _, template = label.split(" ", 1)
    provider = "test"
    if "{provider_name}" in template:
        provider = draw(st.sampled_from(["test", "test", "razorpay", "stripe", "\x00", "TEST"]), label="provider")
        template = template.replace("{provider_name}", urllib.parse.quote(provider.encode(), safe="") or "%20")
    headers = {"content-type": "application/json"}
    signature = draw(st.sampled_from(["valid"] * 4 + ["none", "wrong", "upper"]), label="signature")
    signed = known.sign(provider, raw) if known.sign else {}
    if signature == "valid" or signature == "upper":
        headers.update({k: v.upper() if signature == "upper" else v for k, v in signed.items()})
    elif signature == "wrong":
        headers.update({k: "0" * len(v) for k, v in signed.items()} or {"x-test-signature": "00"})
    return Req("POST", template, headers, raw)


# -- the tests ---------------------------------------------------------------------------------------

FUZZ = settings(deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck))


def budget(n: int, database: str) -> int:
    return n if database == "sqlite" else max(3, round(n * POSTGRES_SHARE))


def both_modes(label: str) -> st.SearchStrategy[Any]:
    op = OPERATIONS[label]
    return st.one_of(op.as_strategy(GenerationMode.POSITIVE), op.as_strategy(GenerationMode.NEGATIVE))


@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_schemathesis_cases_never_get_a_5xx(live: Live, label: str) -> None:
    """Positive and negative cases from the schema, mostly authenticated, ids often real."""
    known = live.known
    assert known is not None
    findings = Findings()

    @settings(FUZZ, max_examples=budget(EXAMPLES, live.database))
    @given(case=both_modes(label), data=st.data())
    def run(case: Any, data: st.DataObject) -> None:
        steer(case, data.draw, live)
        req = case_request(case)
        if req is None:
            return
        refused = False
        if auth_kind(label) != "public":
            if data.draw(st.integers(0, 9), label="auth") < 8:
                creds = data.draw(good_credentials(label, known), label="credentials")
            else:
                creds, refused = data.draw(bad_credentials(label, known), label="bad credentials"), True
            req = with_headers(req, creds)
        findings.check(label, req, live.call(req), refused=refused)

    run()
    findings.assert_none()


@pytest.mark.parametrize("label", WITH_INPUT)
def test_junk_input_never_gets_a_5xx(live: Live, label: str) -> None:
    """Hand-made junk: broken JSON, wrong types, huge numbers, odd strings, headers and paths."""
    known = live.known
    assert known is not None
    findings = Findings()

    @settings(FUZZ, max_examples=budget(JUNK_EXAMPLES, live.database))
    @given(req=junk_request(label, known))
    def run(req: Req) -> None:
        findings.check(label, req, live.call(req))

    run()
    findings.assert_none()


@pytest.mark.parametrize("label", PROTECTED)
def test_requests_without_valid_credentials_are_refused(live: Live, label: str) -> None:
    """No, wrong, malformed, forged or under-scoped credentials: 401 or 403 with a JSON body,
    whatever the rest of the request holds."""
    known = live.known
    assert known is not None
    findings = Findings()

    @settings(FUZZ, max_examples=budget(AUTH_EXAMPLES, live.database))
    @given(case=OPERATIONS[label].as_strategy(GenerationMode.POSITIVE), creds=bad_credentials(label, known))
    def run(case: Any, creds: dict[str, str | None]) -> None:
        req = case_request(case)
        if req is not None:
            req = with_headers(req, creds)
            findings.check(label, req, live.call(req), refused=True)

    run()
    findings.assert_none()


@pytest.mark.parametrize("label", PAYMENT_OPS)
def test_signed_payment_events_never_get_a_5xx(live: Live, label: str) -> None:
    """Payment provider events (the webhook, the test checkout's completion), signed with the
    provider's secret so they reach the handler: bad JSON, unknown orders, wrong amounts and
    currencies, refunds before payment, replays, odd values."""
    known = live.known
    assert known is not None
    assert known.sign is not None, "the app serves payment providers: their events must be fuzzed"
    findings = Findings()

    @settings(FUZZ, max_examples=budget(EXAMPLES, live.database))
    @given(req=payment_event(label, known))
    def run(req: Req) -> None:
        findings.check(label, req, live.call(req))

    run()
    findings.assert_none()


# -- every field through its edge values, one at a time ----------------------------------------------

SWEEP_NUMBERS: list[Any] = [*ODD_INTS, 1.5, 1e308, float("inf"), float("nan"), True, "7", None, [], {}]
SWEEP_STRINGS: list[Any] = ["", " ", "\x00", "nul\x00@example.com", "\ud800", "a\udc80b", "a" * 10_000,
                            "\U0001f980" * 40, " fuzz-1", "9" * 21, "%00", "\t\n", "1e400", 0, -1, 2**64, None, [], {}]
SWEEP_DATES: list[Any] = [*ODD_DATES, 0, 2**64, None]
SWEEP_ARRAYS: list[Any] = [None, "meter", [1], [None], ["\ud800"], [""], ["meter"] * 1_000, {}]
SWEEP_HEADER = ["", " ", "\x7f", "é" * 10, "k" * 255, "k" * 256, "k" * 10_000, "a\tb"]


def sweep_values(schema: dict[str, Any]) -> list[Any]:
    kinds = _kinds(schema)
    if "integer" in kinds or "number" in kinds:
        return SWEEP_NUMBERS
    if "date-time" in kinds:
        return SWEEP_DATES
    if "array" in kinds:
        return SWEEP_ARRAYS
    return SWEEP_STRINGS


FRESH: dict[str, Callable[[], str]] = {  # fields that must be new for the request to get far
    "code": lambda: f"SWEEP_{uuid.uuid4().hex[:8].upper()}",
    "email": lambda: f"sweep-{uuid.uuid4().hex[:8]}@example.com",
}


def _plain(name: str, schema: dict[str, Any], known: Known) -> Any:
    if name in FRESH:
        return FRESH[name]()
    if name in known.values:
        return known.values[name][0]
    kinds = _kinds(schema)
    if "integer" in kinds:
        return 1
    if "date-time" in kinds:
        return "2030-01-01T00:00:00Z"
    return [] if "array" in kinds else "x"


def swept_requests(label: str, known: Known) -> Iterator[Req]:
    """A plain, valid-looking request, then each input replaced in turn by each edge value."""
    method, template = label.split(" ", 1)
    schema = body_schema(label)
    props: dict[str, Any] = (schema or {}).get("properties", {})
    required = set((schema or {}).get("required", []))
    base_body = {n: _plain(n, p, known) for n, p in props.items() if n in required or n in known.values}
    path_params = {p["name"]: str(_plain(p["name"], p.get("schema", {}), known)) for p in _params(label, "path")}
    creds = {"authorization": f"Bearer {MASTER_KEY}"} if auth_kind(label) == "service" else (
        {"authorization": known.user_auth} if auth_kind(label) == "user" else {})

    def build(body: dict[str, Any] | None = None, path: dict[str, str] | None = None,
              query: dict[str, str] | None = None, headers: dict[str, str] | None = None) -> Req:
        url = template
        for name, value in (path or path_params).items():
            encoded = urllib.parse.quote(value.encode("utf-8", "surrogatepass"), safe="")
            url = url.replace("{" + name + "}", encoded or "%20")
        if query:
            url += "?" + urllib.parse.urlencode({k: v.encode("utf-8", "surrogatepass") for k, v in query.items()})
        all_headers = {**creds, **(headers or {})}
        raw = b""
        if schema is not None:
            all_headers["content-type"] = "application/json"
            body = dict(base_body if body is None else body)
            for name, fresh in FRESH.items():
                if name in body and body[name] == base_body.get(name):
                    body[name] = fresh()
            raw = json.dumps(body).encode()
        return Req(method, url, all_headers, raw)

    yield build()
    for name, prop in props.items():
        for value in sweep_values(prop):
            yield build(body={**base_body, name: value})
        yield build(body={k: v for k, v in base_body.items() if k != name})
    for p in _params(label, "path"):
        for value in SWEEP_STRINGS:
            if isinstance(value, str) and value:
                yield build(path={**path_params, p["name"]: value})
    for p in _params(label, "query"):
        for value in sweep_values(p.get("schema", {})):
            if value is not None and not isinstance(value, list | dict):
                yield build(query={p["name"]: value if isinstance(value, str) else json.dumps(value)})
    for p in _params(label, "header"):
        if p["name"].lower() not in CREDENTIAL_HEADERS:
            for value in SWEEP_HEADER:
                yield build(headers={p["name"].lower(): value})


@pytest.mark.parametrize("label", WITH_INPUT)
def test_edge_values_never_get_a_5xx(live: Live, label: str) -> None:
    """Deterministic: every body field, path, query and header parameter through the edge values
    of its type (2**63, 2**64, floats, NaN, surrogates, NUL, 10,000 characters, odd dates...),
    one at a time, the rest of the request valid and authenticated."""
    known = live.known
    assert known is not None
    findings = Findings()
    for req in swept_requests(label, known):
        findings.check(label, req, live.call(req))
    findings.assert_none()


# -- a rejected request changes nothing ------------------------------------------------------------

QUIET_ACCOUNTS = ("quiet-1", "quiet-2")
FLUSHER_TABLES = {"token_transactions", "token_balances"}  # written later by the flusher, not by a request
# Deliberate consequences of a refusal, not changes to what the account holds: the counter of
# failed promo-code attempts (the limiter against guessing codes), and the registration and
# failed-login counters (the limiters against mass sign-ups and password guessing).
COUNTED_REFUSALS = (":promofail:", ":reg:", ":{login:")


async def state_of(api: Api) -> dict[str, Any]:
    """Everything a request can change: every key under the prefix (a stream by its last id, as
    the flusher trims it) and every row of the tables requests write."""
    redis = api.state.rt.redis
    keys = sorted([k async for k in redis.scan_iter(match=f"{api.settings.key_prefix}:*", count=10_000)
                   if not any(part in str(k) for part in COUNTED_REFUSALS)])
    async with redis.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.type(key)
        kinds = [k.decode() if isinstance(k, bytes) else k for k in await pipe.execute()]
    read = {"hash": "hgetall", "string": "get", "stream": "xinfo_stream"}
    async with redis.pipeline(transaction=False) as pipe:
        for key, kind in zip(keys, kinds, strict=True):
            if kind == "zset":
                pipe.zrange(key, 0, -1, withscores=True)
            elif kind in read:
                getattr(pipe, read[kind])(key)
            else:
                pipe.type(key)
        values = await pipe.execute()
    out: dict[str, Any] = {key: value["last-generated-id"] if kind == "stream" else value
                           for key, kind, value in zip(keys, kinds, values, strict=True)}
    # The flusher makes each shard's (empty) stream with its consumer group on its own schedule.
    out = {key: value for key, value in out.items() if value not in ("0-0", b"0-0")}
    async with api.state.rt.db.engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            if table.name not in FLUSHER_TABLES:
                out[f"db:{table.name}"] = sorted(map(repr, (await conn.execute(select(table))).all()))
    return out


def _diff(before: dict[str, Any], after: dict[str, Any]) -> str:
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return "; ".join(f"{k}: {_cut(repr(before.get(k)), 150)} -> {_cut(repr(after.get(k)), 150)}" for k in changed[:5])


@st.composite
def quiet_request(draw: st.DrawFn, live: Live) -> tuple[str, Req | None]:
    known = live.known
    assert known is not None
    label = draw(st.sampled_from(MUTATING), label="operation")
    source = draw(st.sampled_from(["positive", "negative", "junk"]), label="source")
    if label in PAYMENT_OPS and known.sign is not None and source != "junk":
        return label, draw(payment_event(label, known))
    if source == "junk":
        return label, _no_short_holds(draw(junk_request(label, known)))
    mode = GenerationMode.POSITIVE if source == "positive" else GenerationMode.NEGATIVE
    case = draw(OPERATIONS[label].as_strategy(mode))
    steer(case, draw, live)
    req = case_request(case)
    if req is not None and auth_kind(label) != "public":
        bad = draw(st.integers(0, 9)) == 0
        req = with_headers(req, draw(bad_credentials(label, known) if bad else good_credentials(label, known)))
    return label, None if req is None else _no_short_holds(req)


def _no_short_holds(req: Req) -> Req:
    """A hold that expires mid-run changes state by itself (its tokens go back), which would blur
    the check: holds made here last past the run."""
    try:
        body = json.loads(req.body)
    except (ValueError, RecursionError):
        return req
    ttl = body.get("ttl_ms") if isinstance(body, dict) else None
    if isinstance(ttl, int) and not isinstance(ttl, bool) and 0 < ttl < 600_000:
        body["ttl_ms"] = 600_000
        return Req(req.method, req.url, req.headers, json.dumps(body).encode())
    return req


@pytest.mark.parametrize("database", DATABASES)
def test_rejected_requests_change_nothing(tmp_path: Any, database: str) -> None:
    """Any 4xx (bad input, unknown ids, conflicts, refusals) leaves Redis and the database as they
    were. Mixed with accepted requests, so the rejections meet a state that has history."""
    findings = Findings()
    with live_app(tmp_path, QUIET_ACCOUNTS, database) as live:
        assert live.api is not None
        api = live.api

        @settings(FUZZ, max_examples=budget(QUIET_EXAMPLES, database))
        @given(drawn=quiet_request(live))
        def run(drawn: tuple[str, Req | None]) -> None:
            label, req = drawn
            if req is None:
                return
            before = live.run(state_of(api))
            reply = live.call(req)
            if findings.check(label, req, reply) is None and reply.status is not None and 400 <= reply.status < 500:
                after = live.run(state_of(api))
                if after != before:
                    findings.add(label, f"{reply.status} changed state: {_diff(before, after)}", req, reply)

        run()
    findings.assert_none()


# -- regressions: one narrow test per fault the fuzzing found ---------------------------------------


def _call(live: Live, method: str, url: str, body: bytes = b"", **headers: str) -> Reply:
    return live.call(Req(method, url, {k.replace("_", "-").lower(): v for k, v in headers.items()}, body))


def _expect_clear_4xx(reply: Reply, status: int | tuple[int, ...]) -> dict[str, Any]:
    assert reply.error is None, reply.show()
    want = status if isinstance(status, tuple) else (status,)
    assert reply.status in want, reply.show()
    body = reply.json()
    assert isinstance(body, dict) and body.get("error") and body.get("message"), body
    return body


def test_a_transactions_cursor_past_64_bits_is_a_422(live: Live) -> None:
    """Found by the fuzzing: ?cursor=2**63 reached SQLite, and OverflowError gave a 500."""
    assert live.known is not None
    for cursor in (2**63, 2**64, 10**30):
        reply = _call(live, "GET", f"/api/v1/tokens/transactions?cursor={cursor}", authorization=live.known.user_auth)
        assert _expect_clear_4xx(reply, 422)["field"] == "cursor"


def test_a_promo_code_cap_past_64_bits_is_a_422(live: Live) -> None:
    """Found by the fuzzing: max_redemptions=2**63 reached SQLite, and OverflowError gave a 500."""
    for i, cap in enumerate((2**63, 2**64)):
        body = json.dumps({"code": f"HUGECAP{i}", "bonus_tokens": 5, "max_redemptions": cap}).encode()
        reply = _call(live, "POST", "/api/v1/admin/promo-codes", body, authorization=f"Bearer {MASTER_KEY}",
                      content_type="application/json")
        assert _expect_clear_4xx(reply, 422)["field"] == "max_redemptions"


def test_a_body_that_is_not_json_is_named_as_the_body(live: Live) -> None:
    """Found by the fuzzing: for a JSON decode error the 422 named the character offset
    ("field": "0", message "0: JSON decode error"), not the body."""
    for raw in (b"\x00", b"{", b'{"account_id": "fuzz-1", "tokens": 1}]'):
        reply = _call(live, "POST", "/api/v1/meter/debit", raw, authorization=f"Bearer {MASTER_KEY}",
                      content_type="application/json")
        assert _expect_clear_4xx(reply, (400, 422)).get("field", "body") == "body", reply.show()


def test_a_bad_idempotency_key_is_named_as_such(live: Live) -> None:
    """Found by the fuzzing: a non-printable Idempotency-Key got a 422 naming "request_id", which
    is no field or header of the request."""
    reply = _call(live, "POST", "/api/v1/meter/debit", b'{"account_id": "fuzz-1", "tokens": 1}',
                  authorization=f"Bearer {MASTER_KEY}", content_type="application/json", idempotency_key="a\tb")
    assert _expect_clear_4xx(reply, 422)["field"].lower() == "idempotency-key"


def test_a_bad_grant_reason_is_named_as_such(live: Live) -> None:
    """Found by the fuzzing: a grant reason with a control character got a 422 naming "note",
    the meter's name for it, not the request's "reason"."""
    reply = _call(live, "POST", "/api/v1/admin/accounts/fuzz-1/grants", b'{"tokens": 5, "reason": "a\\nb"}',
                  authorization=f"Bearer {MASTER_KEY}", content_type="application/json")
    assert _expect_clear_4xx(reply, 422)["field"] == "reason"


def _fresh_user(live: Live) -> str:
    """A user of its own (no failed promo attempts counted against it), without the slow hash."""
    assert live.api is not None
    account = f"u_{uuid.uuid4().hex[:16]}"
    live.run(live.api.state.rt.meter.open_account(account))
    live.run(live.api.add_account_row(account))
    return "Bearer " + issue_token(live.api.state.jwt_secret, account, 3600)


def _no_5xx(live: Live, requests_: list[Req]) -> None:
    findings = Findings()
    for req in requests_:
        findings.check(f"{req.method} {req.url.split('?')[0]}", req, live.call(req))
    findings.assert_none()


def test_nul_characters_are_a_4xx_not_a_500(live: Live) -> None:
    """Found by the fuzzing on Postgres, which refuses NUL in text ("invalid byte sequence for
    encoding UTF8: 0x00"): stored or looked up, a NUL gave a 500. (SQLite accepts it.)"""
    assert live.known is not None
    user = {"authorization": live.known.user_auth}
    svc = {"authorization": f"Bearer {MASTER_KEY}"}
    js = {"content-type": "application/json"}
    _no_5xx(live, [
        Req("POST", "/api/v1/projects", {**user, **js}, b'{"title": "a\\u0000b"}'),
        Req("POST", "/api/v1/projects/%00/execute", user),
        Req("GET", "/api/v1/tokens/transactions?type=%00", user),
        Req("GET", "/api/v1/tokens/purchases/%00", user),
        Req("POST", "/api/v1/tokens/redeem-code", {"authorization": _fresh_user(live), **js},
            b'{"promo_code": "A\\u0000B"}'),
        Req("POST", "/api/v1/auth/register", js, b'{"email": "nul\\u0000@example.com", "password": "long-enough-1"}'),
        Req("POST", "/api/v1/auth/login", js, b'{"email": "nul\\u0000@example.com", "password": "long-enough-1"}'),
        Req("POST", "/api/v1/admin/api-keys", {**svc, **js}, b'{"name": "a\\u0000b", "scopes": ["meter"]}'),
        Req("DELETE", "/api/v1/admin/api-keys/%00", svc),
        Req("DELETE", "/api/v1/admin/promo-codes/%00", svc),
        Req("GET", "/api/v1/admin/accounts?q=%00", svc),
    ])


def test_dates_outside_the_databases_range_are_a_4xx_not_a_500(live: Live) -> None:
    """Found by the fuzzing on Postgres: a date of 9999-12-31T23:59:59-23:59 (year 10000 in UTC)
    or 0001-01-01T00:00:00+23:59 (year 0) gave a 500 "date value out of range": since/until of
    the history and analytics, starts_at/ends_at of a promo code."""
    assert live.known is not None
    user = {"authorization": live.known.user_auth}
    svc = {"authorization": f"Bearer {MASTER_KEY}", "content-type": "application/json"}
    reqs = []
    for value in ("9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59"):
        for path in ("/api/v1/tokens/analytics", "/api/v1/tokens/transactions"):
            for name in ("since", "until"):
                reqs.append(Req("GET", f"{path}?{urllib.parse.urlencode({name: value})}", user))
        for name in ("starts_at", "ends_at"):
            body = {"code": f"DATE_{uuid.uuid4().hex[:8].upper()}", "bonus_tokens": 5, name: value}
            reqs.append(Req("POST", "/api/v1/admin/promo-codes", svc, json.dumps(body).encode()))
    _no_5xx(live, reqs)


def test_a_webhook_for_an_unconfigured_provider_is_not_a_5xx(live: Live) -> None:
    """Found by the fuzzing: POST /api/v1/payments/webhook/razorpay on a server without Razorpay
    settings answers 503 provider_not_configured. No input may get a 5xx: a provider this server
    does not run is unknown to it (404), whoever calls."""
    reply = _call(live, "POST", "/api/v1/payments/webhook/razorpay", b'{"event": "payment.captured"}',
                  content_type="application/json", x_razorpay_signature="00")
    _expect_clear_4xx(reply, (400, 404))
