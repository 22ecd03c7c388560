"""Processes a test starts, stopped in every outcome.

`start_process` puts the child in its own session (process group), so `stop_process` reaches
its children too (`dev.py serve` runs `tokenmeter serve` as a child). Stopping sends SIGTERM to
the group and SIGKILL after a grace period. Never SIGINT: a suite run in the background
(`cmd &`) inherits SIGINT as ignored, so a server stopped with it keeps running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["free_port", "running", "start_process", "stop_process", "wait_healthy"]


def free_port() -> int:
    """A free TCP port on the loopback interface (bound to 0, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_process(cmd: list[str], **popen: Any) -> subprocess.Popen[bytes]:
    popen.setdefault("stdout", subprocess.DEVNULL)
    popen.setdefault("stderr", subprocess.DEVNULL)
    return subprocess.Popen(cmd, start_new_session=True, **popen)


def _signal_group(proc: subprocess.Popen[Any], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)  # the session leader's pid is its group id


def stop_process(proc: subprocess.Popen[Any], grace_s: float = 10.0) -> int:
    """SIGTERM the process and its group, SIGKILL after `grace_s`; its exit code (or -9)."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait(grace_s)
    _signal_group(proc, signal.SIGKILL)  # children that outlived their parent
    for stream in (proc.stdout, proc.stderr, proc.stdin):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    return int(proc.returncode)


@contextlib.contextmanager
def running(cmd: list[str], grace_s: float = 10.0, **popen: Any) -> Iterator[subprocess.Popen[bytes]]:
    """`with running([...]) as proc:` — stopped (SIGTERM, then SIGKILL) however the block ends."""
    proc = start_process(cmd, **popen)
    try:
        yield proc
    finally:
        stop_process(proc, grace_s)


async def wait_healthy(client: Any, timeout_s: float = 30.0) -> None:
    """Wait until the server behind `client` (an httpx.AsyncClient) answers /healthz with 200;
    fail the test after `timeout_s`."""
    import asyncio

    import httpx
    import pytest

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if (await client.get("/healthz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.1)
    pytest.fail("the service did not come up")
