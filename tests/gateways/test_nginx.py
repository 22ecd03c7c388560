"""The shipped nginx example (examples/nginx/tokenmeter.conf) with Debian's nginx in front of a
fake upstream and a real `tokenmeter serve`: what a gateway team would try first."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx

from tests.gateways.servers import MASTER_KEY, ROOT, FakeUpstream, need_nginx, nginx_with, tokenmeter_server

EXAMPLE = ROOT / "examples" / "nginx" / "tokenmeter.conf"
SVC = {"Authorization": f"Bearer {MASTER_KEY}"}


async def _register(tm: httpx.AsyncClient) -> tuple[str, dict[str, str]]:
    r = await tm.post("/api/v1/auth/register", json={"email": f"{uuid.uuid4().hex[:8]}@example.com",
                                                     "password": "s3cret-pass-nginx"})
    assert r.status_code == 201, r.text
    return r.json()["user_id"], {"Authorization": f"Bearer {r.json()['access_token']}"}


async def _remaining(tm: httpx.AsyncClient, account: str) -> int:
    return int((await tm.get(f"/api/v1/meter/accounts/{account}/balance", headers=SVC)).json()["remaining_tokens"])


async def test_nginx_auth_request_meters_every_call(tmp_path: Path) -> None:
    need_nginx()
    with FakeUpstream() as upstream, tokenmeter_server(tmp_path) as (tm_port, tm_proc):
        values = {"TOKENMETER": f"127.0.0.1:{tm_port}", "UPSTREAM": f"127.0.0.1:{upstream.port}",
                  "SERVICE_KEY": MASTER_KEY}
        with nginx_with(EXAMPLE, tmp_path, **values) as port:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{tm_port}", timeout=10) as tm, \
                    httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as gw:
                user, auth = await _register(tm)

                # allowed: proxied, charged the configured 1,000, the meter's headers added
                r = await gw.post("/v1/chat/completions", json={"model": "gpt-4o-mini"}, headers=auth)
                assert r.status_code == 200, r.text
                assert r.json()["path"] == "/v1/chat/completions"
                assert r.headers["x-tokens-remaining"] == "9000"
                assert r.headers["x-ratelimit-remaining-requests"] == "99"
                assert r.headers["x-tokenmeter-transaction"].startswith(f"{user}:")
                assert "authorization" not in upstream.calls[-1]  # the user's token stays at the gateway
                calls = len(upstream.calls)

                # no token, a bad token, a spoofed account: 401, the upstream never called
                for headers in ({}, {"Authorization": "Bearer nope"}, {"X-Tokenmeter-Account": user}):
                    r = await gw.post("/v1/chat/completions", json={}, headers=headers)
                    assert r.status_code == 401 and r.json()["error"] == "unauthorized", r.text

                # a retried Idempotency-Key is charged once
                key = {"Idempotency-Key": f"retry-{uuid.uuid4().hex}"}
                for _ in range(3):
                    r = await gw.post("/v1/chat/completions", json={}, headers={**auth, **key})
                    assert r.status_code == 200
                assert await _remaining(tm, user) == 8000

                # drain the balance: 402 with the reason and the numbers
                r = await tm.post("/api/v1/meter/debit", json={"account_id": user, "tokens": 7500}, headers=SVC)
                assert r.status_code == 200
                r = await gw.post("/v1/chat/completions", json={}, headers=auth)
                assert r.status_code == 402, r.text
                body = r.json()
                assert (body["reason"], body["required"], body["available"], body["shortage"]) == \
                    ("insufficient", 1000, 500, 500)
                assert body["message"] == "Need 500 more tokens. Current balance: 500"
                assert r.headers["x-tokenmeter-reason"] == "insufficient"

                # the daily cap (100 requests on the free plan): 429 with Retry-After
                other, other_auth = await _register(tm)
                for _ in range(100):
                    r = await tm.post("/api/v1/meter/debit", json={"account_id": other, "tokens": 1}, headers=SVC)
                    assert r.status_code == 200
                r = await gw.get("/v1/models", headers=other_auth)
                assert r.status_code == 429, r.text
                assert int(r.headers["retry-after"]) > 0 and r.json()["reason"] == "daily_cap"
                assert len(upstream.calls) == calls + 3  # only the three allowed retries reached it

                # tokenmeter down: 503 with Retry-After, nothing proxied
                from tests.processes import stop_process

                stop_process(tm_proc, grace_s=20)
                r = await gw.post("/v1/chat/completions", json={}, headers=auth)
                assert r.status_code == 503 and r.headers["retry-after"] == "1"
                assert r.json()["error"] == "metering_unavailable"
                assert len(upstream.calls) == calls + 3
