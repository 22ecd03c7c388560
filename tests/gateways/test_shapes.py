"""Traefik forwardAuth and Envoy ext_authz request shapes, built from the shipped examples
(examples/traefik/dynamic.yml, examples/envoy/envoy.yaml) and sent to the check endpoint as
those gateways send them: the configs and the endpoint must agree."""

from __future__ import annotations

import uuid
from typing import Any

import yaml

from tests.api.conftest import MASTER_KEY, Api
from tests.gateways.servers import ROOT

TRAEFIK = yaml.safe_load((ROOT / "examples" / "traefik" / "dynamic.yml").read_text())["http"]
ENVOY = yaml.safe_load((ROOT / "examples" / "envoy" / "envoy.yaml").read_text())


def _traefik_request(client_headers: dict[str, str]) -> tuple[str, str, dict[str, str]]:
    """(method, url, headers) of Traefik's forwardAuth call for one client request: the headers
    middleware first (an empty value removes), then only authRequestHeaders, plus X-Forwarded-*."""
    middlewares = TRAEFIK["middlewares"]
    chain = TRAEFIK["routers"]["llm"]["middlewares"]
    assert chain.index("tokenmeter-headers") < chain.index("tokenmeter-check") < chain.index("tokenmeter-strip")
    headers = {k.lower(): v for k, v in client_headers.items()}
    for name, value in middlewares["tokenmeter-headers"]["headers"]["customRequestHeaders"].items():
        if value:
            headers[name.lower()] = value
        else:
            headers.pop(name.lower(), None)
    auth = middlewares["tokenmeter-check"]["forwardAuth"]
    passed = {h.lower() for h in auth["authRequestHeaders"]}
    out = {k: v for k, v in headers.items() if k in passed}
    out.update({"x-forwarded-method": "POST", "x-forwarded-uri": "/v1/chat/completions",
                "x-forwarded-host": "llm.example", "x-forwarded-proto": "https", "x-forwarded-for": "203.0.113.9"})
    path = auth["address"].split("//", 1)[1].split("/", 1)[1]
    return "GET", "/" + path, out


def _envoy_filter() -> dict[str, Any]:
    hcm = ENVOY["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_authz")["typed_config"]


def _envoy_request(client_headers: dict[str, str], path: str) -> tuple[str, str, dict[str, str]]:
    """Envoy's HTTP ext_authz check: the client's method, path_prefix + its path, the allowed
    headers (and Host, Authorization, Content-Length: 0), plus headers_to_add."""
    cfg = _envoy_filter()
    assert cfg["failure_mode_allow"] is False and cfg["status_on_error"]["code"] == 503
    svc = cfg["http_service"]
    allowed = {p["exact"] for p in svc["authorization_request"]["allowed_headers"]["patterns"]}
    out = {k.lower(): v for k, v in client_headers.items() if k.lower() in allowed | {"authorization"}}
    out["content-length"] = "0"
    out["x-request-id"] = str(uuid.uuid4())  # Envoy's own id, unique per request
    out.update({h["key"]: h["value"] for h in svc["authorization_request"]["headers_to_add"]})
    return "POST", svc["path_prefix"] + path, out


def _with_key(method: str, url: str, headers: dict[str, str]) -> tuple[str, str, dict[str, str]]:
    """The example's placeholder key replaced by the test's."""
    return method, url, {k: (MASTER_KEY if v.startswith("tmk_replace") else v) for k, v in headers.items()}


def _client_headers(patterns: list[dict[str, str]], headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items()
            if any(k == p.get("exact") or ("prefix" in p and k.startswith(p["prefix"])) for p in patterns)}


async def test_traefik_forward_auth(api: Api) -> None:
    user, auth = await api.register()
    # the client tries to name another account: the headers middleware removes the claim
    method, url, headers = _with_key(*_traefik_request({**auth, "X-Tokenmeter-Account": "someone-else",
                                                        "Idempotency-Key": "call-1"}))
    r = await api.client.request(method, url, headers=headers)
    assert r.status_code == 200, r.text
    copied = {h.lower() for h in TRAEFIK["middlewares"]["tokenmeter-check"]["forwardAuth"]["authResponseHeaders"]}
    assert {"x-tokens-remaining", "x-tokenmeter-transaction"} <= copied
    assert r.headers["x-tokens-remaining"] == "9000"
    assert r.headers["x-tokenmeter-transaction"].startswith(f"{user}:")
    again = await api.client.request(method, url, headers=headers)  # a retry: charged once
    assert again.headers["x-tokenmeter-transaction"] == r.headers["x-tokenmeter-transaction"]
    # no user token: 401, which Traefik returns to the client as it is
    method, url, headers = _with_key(*_traefik_request({}))
    assert (await api.client.request(method, url, headers=headers)).status_code == 401
    # a drained balance: 402 with the brief's body (Traefik passes status, body and headers on)
    for _ in range(9):
        await api.client.request(*_with_key(*_traefik_request(auth))[:2],
                                 headers=_with_key(*_traefik_request(auth))[2])
    method, url, headers = _with_key(*_traefik_request(auth))
    r = await api.client.request(method, url, headers=headers)
    assert r.status_code == 402 and r.json()["shortage"] == 1000 and r.headers["x-tokenmeter-reason"] == "insufficient"


async def test_envoy_ext_authz(api: Api) -> None:
    user, auth = await api.register()
    cfg = _envoy_filter()
    client_patterns = cfg["http_service"]["authorization_response"]["allowed_client_headers"]["patterns"]
    upstream_patterns = cfg["http_service"]["authorization_response"]["allowed_upstream_headers"]["patterns"]
    method, url, headers = _with_key(*_envoy_request({**auth, "Idempotency-Key": "e-1",
                                                      "X-Tokenmeter-Model": "claude-3-5-sonnet-20241022"},
                                                     "/v1/messages?beta=true"))
    assert url.startswith("/api/v1/gateway/check/v1/messages")
    r = await api.client.request(method, url, headers=headers)
    assert r.status_code == 200, r.text
    assert _client_headers(upstream_patterns, dict(r.headers))["x-tokenmeter-transaction"].startswith(f"{user}:")
    passed = _client_headers(client_patterns, dict(r.headers))
    assert passed["x-tokens-remaining"] == "9000" and "x-ratelimit-remaining-tokens" in passed
    assert "ratelimit-policy" in passed
    # the daily cap: 429 with Retry-After and the reason among the headers Envoy passes back
    for _ in range(99):
        _, _, h = _with_key(*_envoy_request({**auth, "X-Tokenmeter-Model": "gpt-4o"}, "/v1/chat/completions"))
        h["x-tokenmeter-tokens"] = "1"
        assert (await api.client.request("POST", url, headers=h)).status_code == 200
    r = await api.client.request(method, url.replace("messages", "complete"), headers={**headers,
                                                                                       "idempotency-key": "e-2"})
    assert r.status_code == 429
    passed = _client_headers(client_patterns, dict(r.headers))
    assert int(passed["retry-after"]) > 0 and passed["x-tokenmeter-reason"] == "daily_cap"
