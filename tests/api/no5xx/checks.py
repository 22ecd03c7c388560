"""What every reply must satisfy, and the faults found, each with its shortest reproduction."""

from __future__ import annotations

import json
import re

import pytest

from tests.api.no5xx.asgi import Reply, Req, _cut
from tests.api.no5xx.schema import _spec, body_schema, operations


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
            known_op = label in operations()  # (not for a concrete path, as in the regression tests)
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
        print(f" [checked {self.requests} requests]", end="")  # the same count as before the split (-s)
        if self.seen:
            pytest.fail(self.report(), pytrace=False)


# -- building requests ----------------------------------------------------------------------------
