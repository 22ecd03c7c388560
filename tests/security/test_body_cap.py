"""One request-size cap for every route (TOKENMETER_MAX_BODY_BYTES, default 64 KiB): a body over it
is 413 `payload_too_large`, refused from its Content-Length before it is read, or, when chunked,
as soon as the bytes read pass the cap; the rest is never read. Proven on a real uvicorn server:
a 64 MiB body streamed to /auth/register (unauthenticated) leaves the server's RSS where it was
(it used to be read in full: +60 MB)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.conftest import Api, make_settings, running_app
from tests.processes import wait_healthy

ROOT = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024
REGISTER = "/api/v1/auth/register"


@pytest.fixture
async def http_api(tmp_path: Any) -> AsyncIterator[Api]:
    async with running_app(make_settings(tmp_path)) as a:
        yield a


@pytest.mark.redis
async def test_over_the_cap_is_413_in_the_apps_error_shape(http_api: Api) -> None:
    api = http_api
    cap = api.settings.max_body_bytes
    assert cap == 64 * 1024
    big = b"{" + b" " * cap + b"}"
    r = await api.client.post(REGISTER, content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large", r.text
    assert set(r.json()) >= {"error", "message"}

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked
        for _ in range(64):
            yield b" " * 4096
    r = await api.client.post("/api/v1/admin/promo-codes", content=chunks(),
                              headers={**api.service(), "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large", r.text
    # under the cap nothing changes
    r = await api.client.post(REGISTER, json={"email": "cap@example.com", "password": "s3cret-pass",
                                              "pad": "x" * (cap // 2)})
    assert r.status_code == 201, r.text


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def _read_response(reader: asyncio.StreamReader) -> bytes:
    """The whole response: its head, then Content-Length bytes of body (the head and the body
    may come in separate reads: one read alone sometimes got only the head)."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = await reader.read(65536)
        if not more:
            return data
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        more = await reader.read(65536)
        if not more:
            break
        body += more
    return head + b"\r\n\r\n" + body


async def stream_body(port: int, head: bytes, chunk: bytes, count: int, chunked: bool) -> tuple[bytes, int]:
    """Send `head`, then up to `count` chunks, stopping when the server answers or hangs up;
    return (the response, bytes of body sent)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    response = asyncio.ensure_future(asyncio.wait_for(_read_response(reader), 30))
    sent = 0
    try:
        writer.write(head)
        # A Content-Length over the cap is answered from the head alone. Wait for that answer
        # first: once the server has answered and closed, more body from us makes its kernel
        # reset the connection, which can discard the 413 before we read it (a real client sees
        # a reset either way; this test is about what the server reads and answers).
        await asyncio.wait({response}, timeout=2)
        for _ in range(count):
            # let the reader run between chunks: drain() does not yield while the socket takes
            # data, and a 413 left unread when the server's close turns our next write into a
            # reset is lost (seen on a loaded machine)
            await asyncio.sleep(0)
            if response.done():
                break
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            sent += len(chunk)
            try:
                await asyncio.wait_for(writer.drain(), 5)
            except (ConnectionError, OSError, TimeoutError):
                break
        else:
            if chunked:
                writer.write(b"0\r\n\r\n")
        try:
            return await response, sent
        except (ConnectionError, OSError):
            return b"", sent
    finally:
        response.cancel()
        writer.close()


@pytest.mark.slow
async def test_a_64_mib_body_is_refused_without_being_read(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "DATABASE_URL") and not k.startswith("TOKENMETER_")}
    env.update(PYTHONPATH=str(ROOT), TOKENMETER_MASTER_KEY="cap-test-master-key",
               TOKENMETER_DATABASE_URL=f"sqlite:///{tmp_path / 'cap.sqlite3'}")
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory",
                             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            await wait_healthy(client)
            # warm the register path so its imports and caches are in the baseline
            r = await client.post(REGISTER, json={"email": "warm@example.com", "password": "s3cret-pass"})
            assert r.status_code == 201, r.text
        before = vm_rss_kib(proc.pid)
        chunk = b" " * (64 * 1024)
        count = 64 * MIB // len(chunk)
        results = {}
        for name, head, chunked in (
            ("content-length", b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                               b"Content-Length: %d\r\n\r\n" % (REGISTER.encode(), 64 * MIB), False),
            ("chunked", b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n" % REGISTER.encode(), True),
        ):
            response, sent = await stream_body(port, head, chunk, count, chunked)
            status_line, _, rest = response.partition(b"\r\n")
            assert status_line.startswith(b"HTTP/1.1 413"), (name, response[:300])
            body = json.loads(rest.partition(b"\r\n\r\n")[2])
            assert body["error"] == "payload_too_large", (name, body)
            results[name] = sent
        after = vm_rss_kib(proc.pid)
        growth_mib = (after - before) / 1024
        print(f"\nRSS before {before} KiB, after {after} KiB (+{growth_mib:.1f} MiB); body bytes the client "
              f"got to send before the 413: {results}")
        assert growth_mib < 16, f"RSS grew {growth_mib:.1f} MiB"
        assert all(sent < 64 * MIB for sent in results.values()), results  # refused before the end
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
