"""`tokenmeter serve` for the browser test: a real process on a free loopback port, on the real
Redis (a fresh key prefix) and a fresh PostgreSQL database when they are there (always with
CI=true), else the embedded Redis and a SQLite file. It can be killed and started again on the
same port and stores, to prove the page reconnects by itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import CI, PG_ADMIN_URL, REAL_PG, REAL_REDIS, REDIS_URL, _in_thread
from tests.processes import free_port, start_process, stop_process

ROOT = Path(__file__).resolve().parents[2]
MASTER_KEY = "dashboard-test-master-key-0123456789"
TEST_PAYMENT_SECRET = "dashboard-test-payments-" + "7" * 16


async def _pg_admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


class Service:
    """One service's stores and port; `start()`, `kill()` (SIGKILL, a crash) and `stop()`."""

    def __init__(self, tmp_path: Path, **env_extra: str) -> None:
        self.tmp_path = tmp_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.prefix = f"tmdash{uuid.uuid4().hex[:8]}"
        self.redis = REAL_REDIS or CI
        self.pg_name = f"tmdash_{uuid.uuid4().hex[:10]}" if REAL_PG or CI else None
        if self.pg_name:
            _in_thread(lambda: _pg_admin(f'CREATE DATABASE "{self.pg_name}"'))
            database = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{self.pg_name}"
        else:
            database = f"sqlite:///{tmp_path / 'dashboard.sqlite3'}"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("TOKENMETER_") and k not in ("REDIS_URL", "DATABASE_URL")}
        env.update({"TOKENMETER_MASTER_KEY": MASTER_KEY, "TOKENMETER_KEY_PREFIX": self.prefix,
                    "TOKENMETER_DATABASE_URL": database, "TOKENMETER_JWT_SECRET": "dash-jwt-" + uuid.uuid4().hex,
                    "TOKENMETER_TEST_PAYMENT_SECRET": TEST_PAYMENT_SECRET, "TOKENMETER_FLUSHER_BLOCK_MS": "50",
                    "TOKENMETER_REDIS_TIMEOUT_MS": "2000", "TOKENMETER_REDIS_CONNECT_TIMEOUT_MS": "2000",
                    "PYTHONPATH": str(ROOT), **env_extra})
        if self.redis:
            env["TOKENMETER_REDIS_URL"] = REDIS_URL
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = tmp_path / "tokenmeter.log"

    def start(self, timeout_s: float = 30.0) -> None:
        with self.log_path.open("ab") as log:
            self.proc = start_process([sys.executable, "-m", "api.cli", "serve", "--port", str(self.port)],
                                      cwd=self.tmp_path, env=self.env, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"tokenmeter serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        pytest.fail(f"tokenmeter serve did not come up in {timeout_s} s:\n{self.log()}")

    def kill(self) -> None:
        """A crash: SIGKILL, open connections reset."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        stop_process(self.proc, grace_s=5)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace_s=5)  # a kept-open balance stream must not hold the test up

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def cleanup(self) -> None:
        self.stop()
        if self.redis:
            import redis

            client = redis.Redis.from_url(REDIS_URL)
            keys = list(client.scan_iter(match=f"{self.prefix}:*", count=1000))
            for i in range(0, len(keys), 500):
                client.delete(*keys[i:i + 500])
            client.close()
        if self.pg_name:
            _in_thread(lambda: _pg_admin(f'DROP DATABASE IF EXISTS "{self.pg_name}" WITH (FORCE)'))

    def call(self, method: str, path: str, *, key: str = MASTER_KEY, headers: dict[str, str] | None = None,
             **kw: Any) -> httpx.Response:
        """The service's API with a bearer token (the master key by default)."""
        return httpx.request(method, self.url + path, headers={"Authorization": f"Bearer {key}", **(headers or {})},
                             timeout=10, **kw)
