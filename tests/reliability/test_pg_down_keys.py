"""PostgreSQL down (a test-owned cluster, `stop -m immediate`): service-key debits keep working
from the key cache past its TTL; a key revoked in another process stays refused (its Redis
revocation marker); a key never seen gets a JSON 503 `ledger_unavailable`, never a plain 500;
no traceback per request; /readyz says meter ok, ledger down, and answers 200."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import pytest

from tests.api.conftest import MASTER_KEY, make_settings, running_app
from tests.reliability.private_servers import private_postgres

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.usefixtures("real_redis")]

CACHE_S = 0.3


async def _key(api: Any, name: str) -> str:
    r = await api.client.post("/api/v1/admin/api-keys", json={"name": name, "scopes": ["meter"]},
                              headers=api.service(MASTER_KEY))
    assert r.status_code == 201, r.text
    return str(r.json()["key"]), str(r.json()["id"])  # type: ignore[return-value]


async def _debit(api: Any, key: str, account: str = "pgdown-1") -> Any:
    return await api.client.post("/api/v1/meter/debit", json={"account_id": account, "tokens": 5},
                                 headers=api.service(key))


async def test_service_keys_work_while_postgres_is_down(tmp_path: Any, caplog: Any) -> None:
    async with private_postgres() as pg:
        url = await pg.create_database("keys")
        prefix = f"tmkeys{uuid.uuid4().hex[:6]}"
        common = {"database_url": url, "key_prefix": prefix, "flusher": "external", "api_key_cache_s": CACHE_S}
        async with running_app(make_settings(tmp_path, **common)) as one, \
                running_app(make_settings(tmp_path, **common)) as two:  # two processes of one service
            assert (await one.client.post("/api/v1/meter/accounts", json={"account_id": "pgdown-1"},
                                          headers=one.service())).status_code == 201
            (k_live, _), (k_revoked, revoked_id), (k_unseen, _) = [await _key(one, n) for n in ("a", "b", "c")]
            assert (await _debit(two, k_live)).status_code == 200  # verified (and cached) by process two
            assert (await _debit(two, k_revoked)).status_code == 200
            r = await one.client.delete(f"/api/v1/admin/api-keys/{revoked_id}", headers=one.service())
            assert r.status_code == 200
            await asyncio.to_thread(pg.stop, "immediate")
            try:
                await asyncio.sleep(CACHE_S * 2)  # past the key cache's fresh time
                caplog.clear()
                with caplog.at_level(logging.WARNING):
                    answers = [await _debit(two, k_live) for _ in range(50)]
                    assert [a.status_code for a in answers] == [200] * 50
                    r = await _debit(two, k_revoked)  # revoked in process one: refused here too
                    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
                    r = await _debit(two, k_unseen)  # cannot be verified now: 503 JSON, not 500
                    assert r.status_code == 503 and r.json()["error"] == "ledger_unavailable"
                    assert r.headers["content-type"].startswith("application/json")
                    assert r.headers["retry-after"] == "1"
                    r = await _debit(two, "tmk_0123456789ab_unknownsecret")
                    assert r.status_code == 503 and r.json()["error"] == "ledger_unavailable"
                    assert (await _debit(two, MASTER_KEY)).status_code == 200
                    ready = await two.client.get("/readyz")
                tracebacks = [rec for rec in caplog.records if rec.exc_info]
                assert not tracebacks, tracebacks[0].getMessage()
                assert len([rec for rec in caplog.records if rec.name.startswith("tokenmeter")]) <= 2
                assert ready.status_code == 200, ready.text  # the meter works: keep the service in
                body = ready.json()
                assert (body["ready"], body["meter"], body["ledger"]) == (True, "ok", "down")
            finally:
                await asyncio.to_thread(pg.start)
            for _ in range(100):  # the database is back: the unseen key is verified
                r = await _debit(two, k_unseen)
                if r.status_code == 200:
                    break
                await asyncio.sleep(0.1)
            assert r.status_code == 200, r.text
            assert (await _debit(two, k_revoked)).status_code == 401
            assert (await two.client.get("/readyz")).json()["ledger"] == "ok"


async def test_readyz_is_503_when_redis_is_down(tmp_path: Any) -> None:
    """The meter's store unreachable: not ready (the load balancer should send traffic elsewhere)."""
    from tests.reliability.private_servers import private_redis

    async with private_redis(tmp_path) as server, running_app(
            make_settings(tmp_path, redis_url=server.url, flusher="external", readyz_timeout_s=1.0)) as api:
        assert (await api.client.get("/readyz")).status_code == 200
        server.stop()
        r = await api.client.get("/readyz")
        assert r.status_code == 503 and r.json()["meter"] == "down" and r.json()["ready"] is False
        await server.start()  # back, for the app's clean-up
