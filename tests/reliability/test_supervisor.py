"""The service's background work is supervised: a crashed in-process flusher is logged, counted,
fails /readyz while it is down and is restarted with backoff (then flushes again); each periodic
job's last success and failures are reported in /readyz and /metrics."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, select

from persistence.flusher import Flusher
from persistence.models import TokenTransaction
from tests.api.conftest import make_settings, running_app

pytestmark = [pytest.mark.redis]


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def _poll_ready(api: Any, status: int, deadline_s: float = 15.0) -> dict[str, Any]:
    for _ in range(int(deadline_s / 0.05)):
        r = await api.client.get("/readyz")
        if r.status_code == status:
            return dict(r.json())
        await asyncio.sleep(0.05)
    pytest.fail(f"/readyz never answered {status}")


async def test_crashed_flusher_fails_readyz_then_is_restarted(tmp_path: Any, monkeypatch: Any,
                                                              caplog: Any) -> None:
    crash = asyncio.Event()
    real_step = Flusher.step

    async def step(self: Flusher) -> int:
        if crash.is_set():
            crash.clear()
            raise RuntimeError("injected flusher crash")
        return await real_step(self)

    monkeypatch.setattr(Flusher, "step", step)
    settings = make_settings(tmp_path, background_supervise_s=0.1, background_restart_backoff_s=1.0)
    restarts_before = _sample("tokenmeter_task_restarts_total", task="flusher")
    async with running_app(settings) as api:
        ready = await _poll_ready(api, 200)
        assert ready["tasks"]["flusher"] == {"up": True, "restarts": 0, "last_error": None}
        with caplog.at_level(logging.ERROR, logger="tokenmeter.background"):
            crash.set()
            down = await _poll_ready(api, 503)  # down: not ready, though Redis answers
            assert down["meter"] == "ok" and down["tasks"]["flusher"]["up"] is False
            up = await _poll_ready(api, 200)
        assert up["tasks"]["flusher"]["restarts"] == 1
        assert "injected flusher crash" in up["tasks"]["flusher"]["last_error"]
        assert any("background task flusher stopped" in r.getMessage() and r.exc_info for r in caplog.records)
        assert _sample("tokenmeter_task_restarts_total", task="flusher") == restarts_before + 1
        assert _sample("tokenmeter_task_up", task="flusher") == 1
        metrics = (await api.client.get("/metrics")).text
        assert 'tokenmeter_task_restarts_total{task="flusher"}' in metrics
        # the restarted flusher flushes
        rt = api.state.rt
        await rt.meter.open_account("after-restart")
        assert (await rt.meter.debit("after-restart", 10)).allowed
        for _ in range(200):
            async with rt.db.sessions() as s:
                n = (await s.execute(select(func.count()).select_from(TokenTransaction).where(
                    TokenTransaction.account_id == "after-restart"))).scalar_one()
            if n == 2:
                break
            await asyncio.sleep(0.05)
        assert n == 2


async def test_job_failures_and_last_success_are_reported(tmp_path: Any) -> None:
    settings = make_settings(tmp_path, hold_sweep_s=0.1, flusher="external")
    async with running_app(settings) as api:
        rt = api.state.rt
        failures_before = _sample("tokenmeter_job_failures_total", job="hold_sweep")
        for _ in range(100):
            ready = (await api.client.get("/readyz")).json()
            if ready["jobs"]["hold_sweep"]["last_success"]:
                break
            await asyncio.sleep(0.05)
        assert ready["jobs"]["hold_sweep"]["last_success"] is not None
        assert _sample("tokenmeter_job_last_success_timestamp_seconds", job="hold_sweep") > 0
        real = rt.redis.zrangebyscore
        calls = 0

        async def failing(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise ConnectionError("injected sweep failure")
            return await real(*args, **kwargs)

        rt.redis.zrangebyscore = failing
        try:
            for _ in range(100):
                ready = (await api.client.get("/readyz")).json()
                if ready["jobs"]["hold_sweep"]["failures"]:
                    break
                await asyncio.sleep(0.05)
        finally:
            del rt.redis.zrangebyscore
        assert ready["jobs"]["hold_sweep"]["failures"] == 1
        assert "injected sweep failure" in ready["jobs"]["hold_sweep"]["last_error"]
        assert _sample("tokenmeter_job_failures_total", job="hold_sweep") == failures_before + 1
        assert ready["ready"] is True  # a failed job run is reported, not a reason to drop the service


async def test_scheduled_reconcile_reports_drift(tmp_path: Any) -> None:
    """TOKENMETER_RECONCILE_EVERY_S > 0: the service reconciles on its own and exposes the drift."""
    from meter import keys as keyspace

    settings = make_settings(tmp_path, reconcile_every_s=0.2)
    async with running_app(settings) as api:
        rt = api.state.rt
        await rt.meter.open_account("rec-1")
        assert (await rt.meter.debit("rec-1", 7)).allowed
        await api.flush()

        async def drift_after_next_run() -> float:
            """The gauge after a run that started after now (the one in flight may have read earlier)."""
            for _ in range(2):
                last = api.state.background.jobs["reconcile"].last_success
                for _ in range(200):
                    await asyncio.sleep(0.02)
                    if api.state.background.jobs["reconcile"].last_success != last:
                        break
            return _sample("tokenmeter_reconcile_drifting_accounts")

        assert await drift_after_next_run() == 0
        # Redis and the ledger disagree (a bucket changed without a journal entry)
        await rt.redis.hincrby(keyspace.account_keys("rec-1", prefix=rt.settings.key_prefix).account, "b", 1)
        assert await drift_after_next_run() == 1
        ready = (await api.client.get("/readyz")).json()
        assert ready["jobs"]["reconcile"]["failures"] == 0 and ready["jobs"]["reconcile"]["last_success"]
