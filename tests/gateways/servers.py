"""Real processes for the gateway tests: `tokenmeter serve`, a small fake LLM upstream, and
Debian's nginx with a shipped example config, each on a free loopback port, stopped after."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CI, REAL_REDIS, REDIS_URL
from tests.processes import free_port, start_process, stop_process

ROOT = Path(__file__).resolve().parents[2]
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
MASTER_KEY = "gateway-test-master-key-0123456789"


def need_nginx() -> str:
    if NGINX is None:
        if CI:
            pytest.fail("CI=true but nginx is not installed (.ci/run installs nginx-light)")
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    return NGINX


def wait_port(port: int, timeout_s: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    pytest.fail(f"nothing listens on {port} after {timeout_s} s")


class FakeUpstream:
    """An LLM-like upstream: answers every request with a JSON completion; counts calls."""

    def __init__(self) -> None:
        self.calls: list[dict[str, str]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                owner.calls.append({k.lower(): v for k, v in self.headers.items()})
                body = json.dumps({"id": "cmpl-1", "object": "chat.completion", "path": self.path,
                                   "usage": {"prompt_tokens": 10, "completion_tokens": 5}}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeUpstream:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def tokenmeter_server(tmp_path: Path, **env_extra: str) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """`tokenmeter serve` on a free port: the real Redis (a fresh key prefix) when reachable,
    a SQLite file in tmp_path; its keys are deleted after."""
    port = free_port()
    prefix = f"tmgw{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENMETER_") and k not in
           ("REDIS_URL", "DATABASE_URL")}
    env.update({"TOKENMETER_MASTER_KEY": MASTER_KEY, "TOKENMETER_KEY_PREFIX": prefix,
                "TOKENMETER_DATABASE_URL": f"sqlite:///{tmp_path / 'gw.sqlite3'}",
                "TOKENMETER_JWT_SECRET": "gateway-test-jwt-" + uuid.uuid4().hex,
                "TOKENMETER_REDIS_TIMEOUT_MS": "2000", "PYTHONPATH": str(ROOT), **env_extra})
    if REAL_REDIS or CI:
        env["TOKENMETER_REDIS_URL"] = REDIS_URL
    log = (tmp_path / "tokenmeter.log").open("wb")
    proc = start_process([sys.executable, "-m", "api.cli", "serve", "--port", str(port)], cwd=tmp_path,
                         env=env, stdout=log, stderr=log)
    try:
        wait_port(port, proc=proc)
        yield port, proc
    finally:
        stop_process(proc, grace_s=20)
        log.close()
        if REAL_REDIS or CI:
            import redis

            client = redis.Redis.from_url(REDIS_URL)
            keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            for i in range(0, len(keys), 500):
                client.delete(*keys[i:i + 500])
            client.close()


@contextlib.contextmanager
def nginx_with(example: Path, tmp_path: Path, **values: str) -> Iterator[int]:
    """Debian's nginx running `example` (its __NAME__ placeholders filled from `values`,
    __LISTEN__ a free port) in a prefix under tmp_path; the port it listens on."""
    binary = need_nginx()
    port = free_port()
    text = example.read_text()
    for name, value in {**values, "LISTEN": f"127.0.0.1:{port}"}.items():
        text = text.replace(f"__{name}__", value)
    assert "__" not in text.replace("__init__", ""), "a placeholder was left unfilled"
    prefix = tmp_path / "nginx"
    for sub in ("logs", "tmp"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    (prefix / "site.conf").write_text(text)
    t = prefix / "tmp"
    (prefix / "nginx.conf").write_text(f"""
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {t}/body; proxy_temp_path {t}/proxy; fastcgi_temp_path {t}/fastcgi;
    uwsgi_temp_path {t}/uwsgi; scgi_temp_path {t}/scgi;
    include {prefix}/site.conf;
}}
""")
    out = (prefix / "logs" / "stderr.log").open("wb")
    proc = start_process([binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e",
                          str(prefix / "logs" / "error.log")], stdout=out, stderr=out)
    try:
        wait_port(port, timeout_s=10, proc=proc)
        yield port
    finally:
        stop_process(proc, grace_s=5)
        out.close()
