"""The service's background work, supervised: long-running tasks (the in-process flusher) are
restarted with backoff when they crash; periodic jobs (hold sweep, optional reconcile, the
supervision itself) run on APScheduler's AsyncIOScheduler on the app's event loop.

Every crash is logged with its traceback and counted (`tokenmeter_task_restarts_total{task}`,
`tokenmeter_task_up{task}`); `/readyz` fails while a supervised task is down. Each job's last
success and failure count are kept (`tokenmeter_job_last_success_timestamp_seconds{job}`,
`tokenmeter_job_failures_total{job}`, and /readyz's JSON).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from prometheus_client import Counter, Gauge

from api.runtime import Runtime
from api.settings import Settings
from meter import keys as keyspace
from persistence import replies
from persistence.backlog import BacklogMonitor

__all__ = ["Background", "JobStatus", "SupervisedTask", "sweep_expired_holds"]

log = logging.getLogger("tokenmeter.background")

TASK_RESTARTS = Counter("tokenmeter_task_restarts_total", "Supervised background tasks restarted after a crash",
                        ["task"])
TASK_UP = Gauge("tokenmeter_task_up", "1 while the supervised background task runs, 0 while it is down", ["task"])
JOB_FAILURES = Counter("tokenmeter_job_failures_total", "Runs of a periodic background job that failed", ["job"])
JOB_LAST_SUCCESS = Gauge("tokenmeter_job_last_success_timestamp_seconds",
                         "Unix time of the last successful run of a periodic background job", ["job"])
RECONCILE_DRIFT = Gauge("tokenmeter_reconcile_drifting_accounts",
                        "Accounts whose Redis balance differed from the ledger at the last scheduled reconcile")

Runner = Callable[[asyncio.Event], Coroutine[Any, Any, None]]
Job = Callable[[], Awaitable[None]]


@dataclass
class SupervisedTask:
    name: str
    run: Runner
    task: asyncio.Task[None] | None = None
    restarts: int = 0
    crashes_in_a_row: int = 0
    started_at: float = 0.0
    down_since: float | None = None
    restart_at: float = 0.0
    last_error: str | None = None

    @property
    def up(self) -> bool:
        return self.task is not None and not self.task.done()


@dataclass
class JobStatus:
    name: str
    every_s: float
    last_success: float | None = None  # unix time
    failures: int = 0
    last_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        last = None if self.last_success is None else datetime.fromtimestamp(self.last_success, UTC).isoformat()
        return {"last_success": last, "failures": self.failures, "last_error": self.last_error}


class Background:
    """Supervised tasks and scheduled jobs of one app (start/stop in its lifespan)."""

    def __init__(self, *, supervise_every_s: float = 1.0, backoff_s: float = 1.0,
                 backoff_max_s: float = 30.0) -> None:
        self.supervise_every_s, self.backoff_s, self.backoff_max_s = supervise_every_s, backoff_s, backoff_max_s
        self.tasks: dict[str, SupervisedTask] = {}
        self.jobs: dict[str, JobStatus] = {}
        self._job_fns: dict[str, Job] = {}
        self.scheduler = AsyncIOScheduler(timezone=UTC)
        self.backlog: BacklogMonitor | None = None
        self._stop = asyncio.Event()

    @classmethod
    def for_app(cls, rt: Runtime, settings: Settings) -> Background:
        bg = cls(supervise_every_s=settings.background_supervise_s, backoff_s=settings.background_restart_backoff_s,
                 backoff_max_s=settings.background_restart_backoff_max_s)
        flusher_name = "flusher"
        if settings.flusher == "inprocess":
            from persistence.flusher import default_consumer

            consumer = settings.flusher_consumer or default_consumer("inprocess")
            # A fresh Flusher per start: a crashed one's read-ahead and state are dropped; its
            # pending entries are re-read first (same consumer name).
            bg.supervise(flusher_name, lambda stop: rt.flusher(consumer=consumer).run(stop))
        bg.every("hold_sweep", settings.hold_sweep_s, lambda: sweep_expired_holds(rt))
        if settings.reconcile_every_s > 0:
            bg.every("reconcile", settings.reconcile_every_s, lambda: _reconcile(rt))
        bg.backlog = BacklogMonitor(rt.redis, [keyspace.journal_key(s, settings.key_prefix)
                                               for s in range(settings.shards)])
        return bg

    def supervise(self, name: str, run: Runner) -> None:
        self.tasks[name] = SupervisedTask(name, run)

    def every(self, name: str, seconds: float, fn: Job) -> None:
        self.jobs[name] = JobStatus(name, seconds)
        self._job_fns[name] = fn

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        for t in self.tasks.values():
            self._launch(t)
        now = datetime.now(UTC)
        for name, status in self.jobs.items():
            self.scheduler.add_job(self._run_job, "interval", seconds=status.every_s, args=[name], id=name,
                                   max_instances=1, coalesce=True, next_run_time=now, misfire_grace_time=None)
        self.scheduler.add_job(self.check, "interval", seconds=self.supervise_every_s, id="supervise",
                               max_instances=1, coalesce=True, misfire_grace_time=None)
        self.scheduler.start()

    async def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        running = [t.task for t in self.tasks.values() if t.task is not None]
        if running:
            _, late = await asyncio.wait(running, timeout=timeout_s)
            for task in late:  # a task that ignores the stop event: cancelled, not leaked
                task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*running, return_exceptions=True)

    def _launch(self, t: SupervisedTask) -> None:
        t.task = asyncio.create_task(t.run(self._stop), name=f"tokenmeter-{t.name}")
        t.started_at = time.monotonic()
        t.down_since = None
        TASK_UP.labels(task=t.name).set(1)

    # -- supervision -----------------------------------------------------------------------------

    async def check(self) -> None:
        """Notice crashed tasks (log, count, mark down) and restart them once their backoff passed."""
        if self._stop.is_set():
            return
        now = time.monotonic()
        for t in self.tasks.values():
            if t.task is None or not t.task.done():
                continue
            if t.down_since is None:
                self._crashed(t, now)
            elif now >= t.restart_at:
                t.restarts += 1
                TASK_RESTARTS.labels(task=t.name).inc()
                log.warning("restarting background task %s (restart %d)", t.name, t.restarts)
                self._launch(t)

    def _crashed(self, t: SupervisedTask, now: float) -> None:
        assert t.task is not None
        exc = None if t.task.cancelled() else t.task.exception()
        t.last_error = "cancelled" if t.task.cancelled() else (repr(exc)[:300] if exc else "returned")
        if now - t.started_at > 4 * self.backoff_max_s:  # it had been healthy a while: start over
            t.crashes_in_a_row = 0
        t.crashes_in_a_row += 1
        delay = min(self.backoff_s * 2 ** (t.crashes_in_a_row - 1), self.backoff_max_s)
        t.down_since, t.restart_at = now, now + delay
        TASK_UP.labels(task=t.name).set(0)
        log.error("background task %s stopped (%s); restarting in %.1fs", t.name, t.last_error, delay,
                  exc_info=exc)

    async def _run_job(self, name: str) -> None:
        status = self.jobs[name]
        try:
            await self._job_fns[name]()
        except Exception as exc:
            status.failures += 1
            status.last_error = repr(exc)[:300]
            JOB_FAILURES.labels(job=name).inc()
            log.warning("background job %s failed: %s", name, exc)
        else:
            status.last_success = time.time()
            JOB_LAST_SUCCESS.labels(job=name).set(status.last_success)

    # -- reporting -------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return all(t.up for t in self.tasks.values())

    def status(self) -> dict[str, Any]:
        return {
            "tasks": {n: {"up": t.up, "restarts": t.restarts, "last_error": t.last_error}
                      for n, t in self.tasks.items()},
            "jobs": {n: j.as_dict() for n, j in self.jobs.items()},
        }


async def sweep_expired_holds(rt: Runtime, per_shard: int = 100) -> None:
    """Release expired holds of accounts nobody touches (the lazy release covers the rest)."""
    now = rt.meter.clock.now_ms()
    for shard in range(rt.settings.shards):
        due = await rt.redis.zrangebyscore(keyspace.sweep_key(shard, rt.settings.key_prefix), "-inf", now,
                                           start=0, num=per_shard)
        for account_id in replies.texts(due):
            await rt.meter.sweep_account(account_id)


async def _reconcile(rt: Runtime) -> None:
    from persistence.reconcile import reconcile

    checks = await reconcile(rt.redis, rt.db, shards=rt.settings.shards, prefix=rt.settings.key_prefix)
    drifting = [c for c in checks if not c.ok]
    RECONCILE_DRIFT.set(len(drifting))
    if drifting:
        log.error("scheduled reconcile: %d of %d accounts drift from the ledger (run `tokenmeter reconcile`)",
                  len(drifting), len(checks))
