"""Real processes for the proxy tests: the fake LLM upstream (loadtests/fake_llm.py) and a
`tokenmeter serve` with both upstreams pointed at it, each on a free loopback port, for the module."""

from __future__ import annotations

import contextlib
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from loadtests.fake_llm import UPSTREAM_KEY
from tests.gateways.servers import MASTER_KEY, ROOT, tokenmeter_server, wait_port
from tests.processes import free_port, start_process, stop_process

SVC = {"Authorization": f"Bearer {MASTER_KEY}"}


@contextlib.contextmanager
def fake_llm(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    log = (tmp_path / "fake_llm.log").open("wb")
    proc = start_process([sys.executable, "-m", "loadtests.fake_llm", "--port", str(port)], cwd=ROOT,
                         stdout=log, stderr=log)
    try:
        wait_port(port, timeout_s=20, proc=proc)
        yield port
    finally:
        stop_process(proc, grace_s=5)
        log.close()


def proxy_env(upstream_port: int, **extra: str) -> dict[str, str]:
    base = f"http://127.0.0.1:{upstream_port}"
    return {"TOKENMETER_UPSTREAM_OPENAI": f"{base}/v1", "TOKENMETER_UPSTREAM_OPENAI_KEY": UPSTREAM_KEY,
            "TOKENMETER_UPSTREAM_ANTHROPIC": base, "TOKENMETER_UPSTREAM_ANTHROPIC_KEY": UPSTREAM_KEY, **extra}


@dataclass
class Stack:
    tm: str  # tokenmeter's base URL
    upstream: str  # the fake's base URL
    log: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("proxy")
    with fake_llm(tmp) as up, tokenmeter_server(tmp, **proxy_env(up, TOKENMETER_PROXY_PASSTHROUGH="true",
                                                                 TOKENMETER_FLUSHER_BLOCK_MS="50",
                                                                 TOKENMETER_REGISTER_PER_ADDRESS="1000")) as (port, _):
        yield Stack(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{up}", tmp / "tokenmeter.log")


@pytest.fixture
async def tm(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.tm, timeout=30) as client:
        yield client


async def new_account(tm: httpx.AsyncClient, tokens: int = 0) -> tuple[str, dict[str, str]]:
    """A registered user (10,000 free tokens, plus `tokens` granted as bonus) and its bearer header."""
    r = await tm.post("/api/v1/auth/register", json={"email": f"{uuid.uuid4().hex[:10]}@example.com",
                                                     "password": "s3cret-pass-proxy"})
    assert r.status_code == 201, r.text
    user, token = r.json()["user_id"], r.json()["access_token"]
    if tokens:
        r = await tm.post(f"/api/v1/admin/accounts/{user}/grants", headers=SVC,
                          json={"tokens": tokens, "reason": "proxy test"})
        assert r.status_code == 200, r.text
    return user, {"Authorization": f"Bearer {token}"}


async def balance(tm: httpx.AsyncClient, account: str) -> dict[str, int]:
    r = await tm.get(f"/api/v1/meter/accounts/{account}/balance", headers=SVC)
    assert r.status_code == 200, r.text
    body = r.json()
    return {"remaining": int(body["remaining_tokens"]), "reserved": int(body.get("reserved_tokens", 0))}


async def stats(stack: Stack) -> dict[str, object]:
    async with httpx.AsyncClient(base_url=stack.upstream) as c:
        result: dict[str, object] = (await c.get("/_stats")).json()
        return result
