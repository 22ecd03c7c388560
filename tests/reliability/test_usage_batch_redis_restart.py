"""A log shipper's batches while Redis crashes and comes back: a real redis-server (AOF,
appendfsync always) is SIGKILLed between two batches. Over HTTP the batch sent to a dead Redis
is a 503 with every event failed and nothing charged; the same batch resent after the restart
charges each new event once and replays the ones charged before the crash. The ledger agrees."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from tests.api.conftest import make_settings, running_app
from tests.reliability._redis_loss import private_redis_server

pytestmark = [pytest.mark.redis, pytest.mark.slow]

USAGE = "/api/v1/meter/usage"


def _events(account: str, first: int, n: int) -> list[dict[str, Any]]:
    return [{"account_id": account, "idempotency_key": f"log-{i}", "tokens": 5, "model": "gpt-4o-mini"}
            for i in range(first, first + n)]


async def test_a_batch_during_a_redis_crash_is_a_503_and_its_resend_charges_each_event_once(tmp_path: Any) -> None:
    async with private_redis_server(str(tmp_path)) as server:
        settings = make_settings(tmp_path, redis_url=server.url, key_prefix=f"tmship{uuid.uuid4().hex[:6]}")
        async with running_app(settings) as api:
            await api.state.rt.meter.open_account("shipper-1", plan="pro")
            auth = api.service()
            before = await api.client.post(USAGE, json={"events": _events("shipper-1", 0, 200)}, headers=auth)
            assert before.status_code == 200 and before.json()["failed"] == 0

            server.kill()  # the host crash, between two batches
            batch = _events("shipper-1", 0, 400)  # the shipper resends everything it is unsure of
            down = await api.client.post(USAGE, json={"events": batch}, headers=auth)
            assert down.status_code == 503 and down.headers["retry-after"] == "1"
            body = down.json()
            assert (body["recorded"], body["failed"], body["charged_tokens"]) == (0, 400, 0)
            assert {r["error"] for r in body["results"]} <= {"store_unavailable", "outcome_unknown"}

            server.start()  # same port and directory: the AOF brings the first batch back
            # the shipper resends on 503 until it gets a 200 (bounded); the first call after the
            # restart may still meet the dead connection (store_unavailable / outcome_unknown)
            charged, attempts = 0, 0
            while True:
                attempts += 1
                again = await api.client.post(USAGE, json={"events": batch}, headers=auth)
                charged += again.json()["charged_tokens"]
                if again.status_code == 200 or attempts == 10:
                    break
                assert again.status_code == 503
                await asyncio.sleep(0.2)
            assert again.status_code == 200, again.text[:500]
            res = again.json()["results"]
            assert all(r["ok"] for r in res) and all(r["replayed"] for r in res[:200])
            assert charged == 200 * 5  # over every resend: each new event charged once

            bal = await api.state.rt.meter.balance("shipper-1")
            assert (bal.used_tokens, bal.total_requests) == (400 * 5, 400)
            await api.flush()
            r = await api.client.get("/api/v1/meter/accounts/shipper-1/balance", headers=auth)
            assert r.json()["used_tokens"] == 2_000
            from sqlalchemy import func, select

            from persistence.models import TokenTransaction

            async with api.state.rt.db.sessions() as session:
                rows = (await session.execute(select(func.count()).where(
                    TokenTransaction.account_id == "shipper-1",
                    TokenTransaction.transaction_type == "usage"))).scalar_one()
            assert rows == 400  # one ledger row per event: none lost, none twice
