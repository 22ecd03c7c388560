"""A raw ASGI client: any bytes and headers reach the app, an event stream is cut after its first
event, and an exception the app raises comes back with the project frames it passed through."""

from __future__ import annotations

import asyncio
import contextlib
import json
import traceback
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REQUEST_TIMEOUT_S = 10.0
HOST = "tokenmeter.test"

NOISE_HEADERS = {"user-agent", "accept-encoding", "accept", "connection", "x-schemathesis-testcaseid",
                 "content-length"}


@dataclass
class Req:
    method: str
    url: str  # path and query, percent-encoded
    headers: dict[str, str]  # lower-case names, latin-1 values
    body: bytes = b""

    def show(self) -> str:
        headers = {k: v for k, v in self.headers.items() if k not in NOISE_HEADERS}
        body = self.body if len(self.body) <= 600 else self.body[:600] + b"...(%d bytes)" % len(self.body)
        return f"{self.method} {_cut(self.url, 400)}\n  headers: {headers}\n  body: {body!r}"


@dataclass
class Reply:
    status: int | None
    headers: dict[str, str]
    body: bytes
    error: str | None = None  # where an exception the app raised came from, or a hang
    raised: str = ""  # that exception in one line

    def json(self) -> Any:
        return json.loads(self.body)

    def show(self) -> str:
        if self.error:
            return f"-> {self.status or 'no response'}; the app raised:\n{_indent(self.error)}"
        return f"-> {self.status} {_cut(self.body.decode('utf-8', 'replace'), 600)}"


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n] + f"...({len(text)} chars)"


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines())


async def asgi_call(app: Any, req: Req, timeout: float = REQUEST_TIMEOUT_S) -> Reply:
    """One request straight into the ASGI app, the way a server would send it. An event stream
    is cut after its first chunk. An exception the app raises (after its 500) is returned with
    its traceback, and so is a request that gets no complete response in time."""
    split = urllib.parse.urlsplit(req.url)
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": req.method, "scheme": "http", "root_path": "",
        "path": urllib.parse.unquote(split.path), "raw_path": split.path.encode("latin-1"),
        "query_string": split.query.encode("latin-1"),
        "headers": [(b"host", HOST.encode()), *((k.encode("latin-1"), v.encode("latin-1"))
                                                for k, v in req.headers.items())],
        "client": ("127.0.0.1", 40000), "server": (HOST, 80),
    }
    done = asyncio.Event()
    sent = False
    status: int | None = None
    headers: dict[str, str] = {}
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": req.body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            headers.update((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            streaming = headers.get("content-type", "").startswith("text/event-stream")
            if not message.get("more_body", False) or (streaming and chunks[-1]):
                done.set()  # an event stream never ends: its first event is enough

    task = asyncio.ensure_future(app(scope, receive, send))
    waiter = asyncio.ensure_future(done.wait())
    await asyncio.wait({task, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    error, raised = None, ""
    if task.done():
        exc = task.exception()
        if exc is not None:
            error = where_raised(exc)
            raised = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    elif done.is_set():  # a cut stream: the app sees the disconnect and stops
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(task, 2)
    else:
        error = raised = f"no complete response within {timeout} s (status {status})"
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
    waiter.cancel()
    return Reply(status, headers, b"".join(chunks), error, raised)


ROOT = str(Path(__file__).resolve().parents[3]) + "/"


def where_raised(exc: BaseException) -> str:
    """The exception and the project's own frames it passed through (not the libraries')."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if f.filename.startswith(ROOT) and "site-packages" not in f.filename]
    lines = [f"{f.filename.removeprefix(ROOT)}:{f.lineno} in {f.name}: {(f.line or '').strip()}" for f in frames[-5:]]
    return "\n".join([*lines, f"{type(exc).__name__}: {_cut(str(exc), 700)}"])


