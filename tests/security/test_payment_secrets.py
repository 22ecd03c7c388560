"""Finding 9 (payments): with the default `test` provider and no TOKENMETER_TEST_PAYMENT_SECRET
the signing secret is random per process (not derived from the JWT secret) and never logged:
logs captured across startup, purchase list, checkout and webhook never contain it; `tokenmeter
serve` prints the run's secret in its banner and nowhere else."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.payments import sign
from api.state import payments_of
from tests.api.conftest import make_settings, running_app
from tests.api.test_purchases import quick_user
from tests.processes import start_process, stop_process, wait_healthy

pytestmark = pytest.mark.redis

ROOT = Path(__file__).resolve().parents[2]


async def test_the_dev_payment_secret_is_random_and_never_logged(tmp_path: Any,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings(tmp_path, payment_provider="test", test_payment_secret=None)
    with caplog.at_level(logging.DEBUG):
        async with running_app(settings) as api:
            _, auth = await quick_user(api)
            listed = await api.client.get("/api/v1/tokens/purchases", headers=auth)  # built the providers
            assert listed.status_code == 200, listed.text
            secret = payments_of(api.app).providers["test"].secret  # type: ignore[attr-defined]
            bought = await api.client.post("/api/v1/tokens/purchase", json={"package_id": "starter"}, headers=auth)
            assert bought.status_code == 201, bought.text
            body = json.dumps(bought.json()["checkout"]["body"]).encode()
            paid = await api.client.post("/api/v1/payments/test/complete", content=body, headers={
                "Content-Type": "application/json", "X-Test-Signature": sign(secret, body)})
            assert paid.status_code == 200 and paid.json()["outcome"] == "credited", paid.text
            forged = await api.client.post("/api/v1/payments/webhook/test", content=b"{}", headers={
                "Content-Type": "application/json", "X-Test-Signature": "0" * 64})
            assert forged.status_code == 400
            assert secret not in bought.text + paid.text + forged.text
    assert caplog.records, "nothing was logged: the capture did not work"
    assert secret not in caplog.text
    assert all(secret not in str(r.args) for r in caplog.records)
    # Not guessable from the JWT secret (the old derivation), and a new process draws a new one.
    assert secret != hmac.new(str(settings.jwt_secret).encode(), b"tokenmeter test payments",
                              hashlib.sha256).hexdigest()
    async with running_app(settings) as again:
        assert payments_of(again.app).providers["test"].secret != secret  # type: ignore[attr-defined]
    assert len(secret) >= 32



async def test_serve_prints_the_run_secret_only_in_its_banner(tmp_path: Any) -> None:
    """`tokenmeter serve` with nothing configured: the banner carries the run's test secret (set
    for all workers), that secret completes a checkout, and nothing else in the output repeats it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "DATABASE_URL") and not k.startswith("TOKENMETER_")}
    env["PYTHONPATH"] = str(ROOT)
    # Its own process group (tests/processes.py): SIGINT would be ignored in a suite run in the
    # background, and `dev.py serve` runs `tokenmeter serve` as a child.
    proc = start_process([sys.executable, str(ROOT / "dev.py"), "serve", "--port", str(port)], cwd=tmp_path,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    banner: list[str] = []
    try:
        secret = ""
        for _ in range(40):  # the banner is printed (and flushed) before the server starts
            line = (await asyncio.to_thread(proc.stdout.readline)).decode()
            banner.append(line)
            found = re.search(r"test payments: completions signed with ([0-9a-f]{64})", line)
            if found or not line:
                secret = found.group(1) if found else ""
                break
        assert secret, "".join(banner)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            await wait_healthy(client)
            r = await client.post("/api/v1/auth/register", json={"email": "s@example.com", "password": "s3cret-pass"})
            assert r.status_code == 201, r.text
            auth = {"Authorization": f"Bearer {r.json()['access_token']}"}
            assert (await client.get("/api/v1/tokens/purchases", headers=auth)).status_code == 200
            bought = await client.post("/api/v1/tokens/purchase", json={"package_id": "starter"}, headers=auth)
            assert bought.status_code == 201, bought.text
            body = json.dumps(bought.json()["checkout"]["body"]).encode()
            paid = await client.post("/api/v1/payments/test/complete", content=body, headers={
                "Content-Type": "application/json", "X-Test-Signature": sign(secret, body)})
            assert paid.status_code == 200 and paid.json()["outcome"] == "credited", paid.text
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            rest = proc.communicate(timeout=20)[0].decode()
        finally:
            stop_process(proc)  # SIGKILL to whatever of the group is left
    assert sum(line.count(secret) for line in banner) == 1
    assert secret not in rest, rest  # not in any log line of the running service
