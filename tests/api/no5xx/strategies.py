"""The generators: schemathesis cases made into raw requests, credentials good and bad, junk
bodies and parameters, signed payment events, and the deterministic sweep of edge values."""

from __future__ import annotations

import json
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import requests
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.api.conftest import MASTER_KEY
from tests.api.no5xx.asgi import HOST, Req
from tests.api.no5xx.live import Known, Live
from tests.api.no5xx.schema import _params, auth_kind, body_schema, needs_admin, operations

# Examples on SQLite; on Postgres a share of them (its own faults are mostly the edge values',
# which every run sweeps in full). The package takes about a minute on two busy cores.
EXAMPLES = 20  # schemathesis cases per operation
JUNK_EXAMPLES = 15  # hand-made junk requests per operation
AUTH_EXAMPLES = 4  # unauthenticated or wrongly authenticated requests per protected operation
QUIET_EXAMPLES = 80  # requests in the "a rejected request changes nothing" run
POSTGRES_SHARE = 0.4


FUZZ = settings(deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck))


def budget(n: int, database: str) -> int:
    return n if database == "sqlite" else max(3, round(n * POSTGRES_SHARE))


def both_modes(label: str) -> st.SearchStrategy[Any]:
    op = operations()[label]
    return st.one_of(op.as_strategy(GenerationMode.POSITIVE), op.as_strategy(GenerationMode.NEGATIVE))


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

