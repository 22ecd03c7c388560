"""The app starts, answers health checks, and meters a debit end to end."""

from __future__ import annotations

import pytest

from tests.api.conftest import Api

pytestmark = pytest.mark.redis


async def test_health_ready_and_a_metered_debit(api: Api) -> None:
    assert (await api.client.get("/healthz")).json() == {"status": "ok"}
    ready = await api.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    r = await api.client.post("/api/v1/meter/accounts", json={"account_id": "gw-1"}, headers=api.service())
    assert r.status_code == 201 and r.json()["remaining_tokens"] == 10_000
    r = await api.client.post("/api/v1/meter/debit", headers={**api.service(), "Idempotency-Key": "k1"},
                              json={"account_id": "gw-1", "tokens": 2_000, "agent": "code", "model": "sonnet"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["allowed"] is True and body["remaining_tokens"] == 8_000 and body["replayed"] is False
    assert r.headers["X-Tokens-Remaining"] == "8000" and r.headers["X-Requests-Today"] == "1"
    assert float(r.headers["X-Process-Time"]) >= 0
    again = await api.client.post("/api/v1/meter/debit", headers={**api.service(), "Idempotency-Key": "k1"},
                                  json={"account_id": "gw-1", "tokens": 2_000, "agent": "code", "model": "sonnet"})
    assert again.json()["replayed"] is True and again.json()["transaction_id"] == body["transaction_id"]
