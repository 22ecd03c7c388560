"""Finding 11 (part): private JSON answers carry `X-Content-Type-Options: nosniff` and
`Cache-Control: no-store`; no redirect or absolute URL is built from the request's Host header."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.api.conftest import Api, make_settings, running_app
from tests.conftest import DATABASES

EVIL = "evil.example"


@pytest.fixture(params=DATABASES)
async def api(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Api]:
    db = {"database_url": request.getfixturevalue("pg_database")} if request.param == "postgres" else {}
    async with running_app(make_settings(tmp_path, **db)) as a:
        yield a


def assert_private(r: Any) -> None:
    assert r.headers.get("x-content-type-options") == "nosniff", (r.request.url, r.headers)
    assert r.headers.get("cache-control") == "no-store", (r.request.url, r.headers)


async def test_user_admin_and_meter_answers_are_private(api: Api) -> None:
    user, auth = await api.register()
    c, svc = api.client, api.service()
    for r in (await c.get("/api/v1/tokens/balance", headers=auth),
              await c.get("/api/v1/tokens/transactions", headers=auth),
              await c.get("/api/v1/tokens/balance"),  # a 401 too
              await c.get("/api/v1/admin/accounts", headers=svc),
              await c.get(f"/api/v1/meter/accounts/{user}/balance", headers=svc),
              await c.post("/api/v1/meter/reserve", headers=svc, json={"account_id": user, "tokens": 5}),
              await c.post("/api/v1/meter/debit", headers=svc, json={"account_id": user, "tokens": 5}),  # fast path
              await c.post("/api/v1/meter/debit", json={"account_id": user, "tokens": 5})):  # its 401
        assert r.status_code < 500
        assert_private(r)
    packages = await c.get("/api/v1/tokens/packages")  # the public price list may be cached
    assert packages.headers["x-content-type-options"] == "nosniff" and "cache-control" not in packages.headers


async def test_no_url_is_built_from_the_host_header(api: Api) -> None:
    host = {"Host": EVIL}
    slash = await api.client.get("/api/v1/tokens/packages/", headers=host)  # Starlette's slash redirect
    assert EVIL not in slash.headers.get("location", "") and slash.status_code == 404
    user, auth = await api.register()
    svc = {**api.service(), **host}
    r = await api.client.post("/api/v1/meter/debit", headers=svc, json={"account_id": user, "tokens": 8000})
    assert r.status_code == 200
    r = await api.client.post("/api/v1/meter/debit", headers=svc, json={"account_id": user, "tokens": 8000})
    assert r.status_code == 402 and r.json()["packages_url"] == "/api/v1/tokens/packages"
    r = await api.client.post("/api/v1/tokens/purchase", json={"package_id": "starter"},
                              headers={**auth, **host, "Idempotency-Key": uuid.uuid4().hex})
    assert r.status_code == 201 and EVIL not in r.text
    assert r.json()["checkout"]["url"].startswith("/")
