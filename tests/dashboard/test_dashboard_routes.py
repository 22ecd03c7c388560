"""The service side of the dashboard, in process: the page and its assets are served from the
package with a strict CSP, and the API additions it reads (the project estimate, the usage filter
that finds settles, integer USD prices)."""

from __future__ import annotations

import re
import uuid

import pytest

from api.dashboard import CSP, STATIC_DIR
from api.security import issue_token
from tests.api.conftest import Api

pytestmark = pytest.mark.redis


async def _user(api: Api) -> tuple[str, dict[str, str]]:
    account = f"u_{uuid.uuid4().hex[:16]}"
    await api.state.rt.meter.open_account(account, plan="free")
    await api.add_account_row(account)
    return account, {"Authorization": f"Bearer {issue_token(api.state.jwt_secret, account, 3600)}"}


async def test_page_and_assets_are_served_from_the_package_with_a_strict_csp(api: Api) -> None:
    r = await api.client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.headers["content-security-policy"] == CSP
    assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP and "default-src 'none'" in CSP
    assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
    page = r.text
    assert 'id="register-form"' in page and 'id="login-form"' in page
    # every asset the page names is this origin's and is served; nothing from another host
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', page)
    assert "/static/js/app.js" in assets and "/static/dashboard.css" in assets
    assert not re.search(r'(?:src|href)="(?:https?:)?//', page)
    for path in assets:
        a = await api.client.get(path)
        assert a.status_code == 200, path
        assert a.headers["content-security-policy"] == CSP
    # the modules import only each other (relative paths), so the whole page is in the package
    for module in sorted((STATIC_DIR / "js").glob("*.js")):
        text = module.read_text()
        for target in re.findall(r'from "([^"]+)"', text):
            assert target.startswith("./") and (module.parent / target).is_file(), (module.name, target)
        assert "innerHTML" not in text and "eval(" not in text, module.name
        assert (await api.client.get(f"/static/js/{module.name}")).status_code == 200
    # the API keeps its own answers: the root page did not shadow anything
    assert (await api.client.get("/healthz")).json() == {"status": "ok"}
    assert "/" not in (await api.client.get("/openapi.json")).json()["paths"]


async def test_project_estimate_tells_the_shortage_before_a_run(api: Api) -> None:
    account, auth = await _user(api)
    required = api.state.rt.catalog.project_estimate_tokens
    assert required > 10_000  # the catalog's run costs more than a new free account has
    r = await api.client.get("/api/v1/projects/estimate", headers=auth)
    assert r.status_code == 200, r.text
    assert r.json() == {"required": required, "available": 10_000, "shortage": required - 10_000,
                        "sufficient": False, "packages_url": "/api/v1/tokens/packages"}
    await api.state.rt.meter.credit(account, required, bucket="bonus", kind="grant", note="test")
    body = (await api.client.get("/api/v1/projects/estimate", headers=auth)).json()
    assert (body["available"], body["shortage"], body["sufficient"]) == (10_000 + required, 0, True)
    # the same figures as the run's own 402
    _, poor_auth = await _user(api)
    project = (await api.client.post("/api/v1/projects", json={"title": "t"}, headers=poor_auth)).json()["id"]
    refused = await api.client.post(f"/api/v1/projects/{project}/execute", headers=poor_auth)
    assert refused.status_code == 402
    estimate = (await api.client.get("/api/v1/projects/estimate", headers=poor_auth)).json()
    assert {k: refused.json()[k] for k in ("required", "available", "shortage", "packages_url")} == \
        {k: estimate[k] for k in ("required", "available", "shortage", "packages_url")}
    assert (await api.client.get("/api/v1/projects/estimate")).status_code == 401


async def test_the_usage_filter_finds_settled_holds_too(api: Api) -> None:
    """The list shows a settle as `usage`; filtering by usage must find it as well."""
    account, auth = await _user(api)
    meter = api.state.rt.meter
    await meter.debit(account, 1_000, agent="code", model="sonnet", request_id="d1")
    hold = await meter.reserve(account, 2_000, agent="ui", request_id="h1")
    assert hold.hold_id is not None
    await meter.settle(account, hold.hold_id, 1_500, agent="ui", request_id="s1")
    await api.flush()
    items = (await api.client.get("/api/v1/tokens/transactions?type=usage", headers=auth)).json()
    assert [(i["type"], i["tokens"], i["agent"]) for i in items] == [("usage", -1_500, "ui"), ("usage", -1_000, "code")]
    assert {i["transaction_type"] for i in items} == {"usage", "settle"}
    settles = (await api.client.get("/api/v1/tokens/transactions?type=settle", headers=auth)).json()
    assert [i["tokens"] for i in settles] == [-1_500]
    analytics = (await api.client.get("/api/v1/tokens/analytics", headers=auth)).json()
    assert analytics["usage_requests"] == 2 and analytics["total_tokens_used"] == 2_500


async def test_prices_come_as_integers_for_the_page(api: Api) -> None:
    body = (await api.client.get("/api/v1/tokens/packages")).json()
    rate = body["inr_paise_per_usd"]
    assert isinstance(rate, int) and rate == api.state.rt.catalog.inr_paise_per_usd
    starter = next(p for p in body["packs"] if p["id"] == "starter")
    assert (starter["price_inr_paise"], starter["price_usd_cents"]) == (9_900, (9_900 * 100 + rate // 2) // rate)
    assert all(isinstance(o["price_usd_cents"], int) for o in body["packs"] + body["plans"])
