"""The README's run command starts a working service with nothing configured: embedded Redis
(fakeredis with Lua), a SQLite file in the working directory, the in-process flusher."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]


async def test_serve_with_no_configuration_answers_healthz_and_a_debit(tmp_path: Any) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "DATABASE_URL") and not k.startswith("TOKENMETER_")}
    env["TOKENMETER_MASTER_KEY"] = "serve-test-master-key"
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen([sys.executable, str(ROOT / "dev.py"), "serve", "--port", str(port)], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            for _ in range(200):
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
            else:
                pytest.fail("the service did not come up")
            svc = {"Authorization": "Bearer serve-test-master-key"}
            r = await client.post("/api/v1/meter/accounts", json={"account_id": "first"}, headers=svc)
            assert r.status_code == 201
            r = await client.post("/api/v1/meter/debit", json={"account_id": "first", "tokens": 1234}, headers=svc)
            assert r.status_code == 200 and r.json()["remaining_tokens"] == 10_000 - 1234
            assert (await client.get("/readyz")).json() == {"ready": True, "redis": "ok", "database": "ok"}
        assert (tmp_path / "tokenmeter.sqlite3").exists()
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=20)[0].decode()
    assert "embedded in-process Redis" in out and "sqlite:///tokenmeter.sqlite3" in out
