"""The README's run command starts a working service with nothing configured: embedded Redis
(fakeredis with Lua), a SQLite file in the working directory, the in-process flusher."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.processes import free_port, start_process, stop_process, wait_healthy

ROOT = Path(__file__).resolve().parents[2]


async def test_serve_with_no_configuration_answers_healthz_and_a_debit(tmp_path: Any) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "DATABASE_URL") and not k.startswith("TOKENMETER_")}
    env["TOKENMETER_MASTER_KEY"] = "serve-test-master-key"
    env["PYTHONPATH"] = str(ROOT)
    log = tmp_path / "serve.log"
    with log.open("wb") as out:  # a file, not a pipe: read after the process is gone
        proc = start_process([sys.executable, str(ROOT / "dev.py"), "serve", "--port", str(port)], cwd=tmp_path,
                             env=env, stdout=out, stderr=out)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            await wait_healthy(client)
            svc = {"Authorization": "Bearer serve-test-master-key"}
            r = await client.post("/api/v1/meter/accounts", json={"account_id": "first"}, headers=svc)
            assert r.status_code == 201
            r = await client.post("/api/v1/meter/debit", json={"account_id": "first", "tokens": 1234}, headers=svc)
            assert r.status_code == 200 and r.json()["remaining_tokens"] == 10_000 - 1234
            ready = (await client.get("/readyz")).json()
            assert (ready["ready"], ready["meter"], ready["ledger"]) == (True, "ok", "ok")
            assert ready["tasks"]["flusher"]["up"] is True
        assert (tmp_path / "tokenmeter.sqlite3").exists()
    finally:
        # SIGTERM to the process group (dev.py and its `tokenmeter serve` child), then SIGKILL:
        # SIGINT is ignored when the suite runs in the background and left servers running.
        stop_process(proc, grace_s=20)
    out = log.read_text()
    assert "embedded in-process Redis" in out and "sqlite:///tokenmeter.sqlite3" in out
