"""The operations under test, read from the app's own OpenAPI schema. The app is built (never
started) on first use, at collection, not when a module is imported."""

from __future__ import annotations

import functools
from typing import Any

import schemathesis

from api.app import create_app
from api.settings import Settings
from tests.api.conftest import MASTER_KEY


@functools.cache
def openapi() -> dict[str, Any]:
    schema: dict[str, Any] = create_app(Settings(master_key=MASTER_KEY, jwt_secret="schema-only")).openapi()
    return schema


@functools.cache
def operations() -> dict[str, Any]:
    """Each operation by its label ("POST /api/v1/meter/debit"), as schemathesis sees it."""
    schema = schemathesis.openapi.from_dict(openapi())
    return {op.label: op for op in (result.ok() for result in schema.get_all_operations())}

def _spec(label: str) -> dict[str, Any]:
    method, path = label.split(" ", 1)
    spec: dict[str, Any] = openapi()["paths"][path][method.lower()]
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
        schema = openapi()["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return dict(schema)



def _has_input(label: str) -> bool:
    return body_schema(label) is not None or bool(_spec(label).get("parameters"))


_KINDS = {
    "all": lambda label: True,
    "protected": lambda label: auth_kind(label) != "public",
    "with_input": _has_input,
    "mutating": lambda label: label.split(" ", 1)[0] in ("POST", "PUT", "PATCH", "DELETE"),
    "payment_ops": lambda label: "payments" in _spec(label).get("tags", []),
}


@functools.cache
def labels(kind: str) -> list[str]:
    """The sorted labels of one kind of operation: all, protected, with_input, mutating, payment_ops."""
    return sorted(label for label in operations() if _KINDS[kind](label))
