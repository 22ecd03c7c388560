"""The metering proxy's machinery: the pooled upstream client, a metered call's books (the hold it
reserved, then exactly one settle or release), and the streaming response that passes Server-Sent
Events through chunk by chunk while a `StreamTap` reads their usage.

A call's hold is closed once, whatever happens: the stream ends (settle the reported usage), the
upstream fails before any output (release), the client goes away or the upstream breaks after
some output (settle what the upstream reported, else an estimate from what was streamed). That
closing runs in its own task, so a cancelled request cannot skip it, and it retries a store that
is briefly away with the same request id (a retry is charged once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client import Counter
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from api.proxy_shapes import Endpoint, Estimate, StreamTap, Vendor
from api.settings import Settings
from meter import Meter, MeterError, OutcomeUnknown, Receipt, StoreUnavailable, UnknownHold
from meter.usage import Usage

__all__ = ["LlmProxy", "MeteredCall", "ProxiedStream", "Upstream"]

log = logging.getLogger("tokenmeter.proxy")

PROXIED = Counter("tokenmeter_proxy_calls_total", "Metered proxy calls by vendor and how their hold closed "
                  "(settled, estimated, released, unsettled)", ["vendor", "outcome"])
FORWARDED_REQUEST_HEADERS = ("content-type", "accept", "user-agent", "anthropic-version", "anthropic-beta",
                             "openai-beta")
DROPPED_RESPONSE_HEADERS = frozenset({
    "connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "set-cookie", "server",
    "date", "proxy-authenticate", "trailer", "upgrade"})
SETTLE_ATTEMPTS = 5  # the store away: 0.1 + 0.2 + 0.4 + 0.8 s of retries before the hold is left to expire
MAX_ERROR_BODY = 1_048_576


@dataclass(frozen=True, slots=True)
class Upstream:
    vendor: Vendor
    base_url: str  # without a trailing slash; OpenAI's includes /v1, Anthropic's does not (as the SDKs)
    api_key: str | None
    anthropic_version: str = "2023-06-01"

    def url(self, path: str) -> str:
        """`path` as the client sent it under /llm/<vendor> (e.g. /v1/chat/completions)."""
        if self.vendor == "openai" and path.startswith("/v1/"):
            path = path[3:]
        return self.base_url + path

    def headers(self, incoming: Mapping[str, str]) -> dict[str, str]:
        """What goes upstream: a few content headers of the caller's, and our own credentials.
        The caller's Authorization, X-Tokenmeter-* and cookies never leave this process."""
        out = {name: incoming[name] for name in FORWARDED_REQUEST_HEADERS if name in incoming}
        out["accept-encoding"] = "identity"  # the tap reads the stream as it passes
        if self.vendor == "anthropic":
            out.setdefault("anthropic-version", self.anthropic_version)
            if self.api_key:
                out["x-api-key"] = self.api_key
        elif self.api_key:
            out["authorization"] = f"Bearer {self.api_key}"
        return out


class LlmProxy:
    """The configured upstreams and one pooled HTTP client for all of them (keep-alive)."""

    def __init__(self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        self.upstreams: dict[Vendor, Upstream] = {}
        if settings.upstream_openai:
            self.upstreams["openai"] = Upstream("openai", settings.upstream_openai.rstrip("/"),
                                                settings.upstream_openai_key)
        if settings.upstream_anthropic:
            self.upstreams["anthropic"] = Upstream("anthropic", settings.upstream_anthropic.rstrip("/"),
                                                   settings.upstream_anthropic_key, settings.anthropic_version)
        timeout = httpx.Timeout(connect=settings.proxy_connect_timeout_s, read=settings.proxy_read_timeout_s,
                                write=settings.proxy_read_timeout_s, pool=settings.proxy_connect_timeout_s)
        limits = httpx.Limits(max_connections=settings.proxy_max_connections * max(len(self.upstreams), 1),
                              max_keepalive_connections=settings.proxy_max_connections)
        self.client = httpx.AsyncClient(timeout=timeout, limits=limits, transport=transport, trust_env=False)

    async def close(self) -> None:
        await self.client.aclose()


@dataclass
class MeteredCall:
    """One proxied call's books: the hold reserved for it, closed exactly once."""

    meter: Meter
    vendor: Vendor
    endpoint: Endpoint
    account: str
    hold_id: str
    estimate: Estimate
    request_key: str | None  # the caller's Idempotency-Key, if any
    labels: dict[str, str | None]
    tasks: list[Any] = field(default_factory=list)  # AppState.tasks: awaited at shutdown
    closed: bool = False
    receipt: Receipt | None = None

    @property
    def _rid(self) -> str:
        """The request id of the settle or release: a retry of either is charged once."""
        return self.request_key or f"px:{self.hold_id}"

    def _model(self, reported: str | None) -> str | None:
        """The model the upstream says answered (a dated alias is priced as its model), if the
        catalog accepts that label; else the one asked for."""
        if reported and reported != self.labels.get("model"):
            try:
                self.meter.catalog.check_model(reported)
                return reported
            except MeterError:
                pass
        return self.labels.get("model")

    async def settle(self, usage: Usage, reported: bool, model: str | None = None) -> Receipt | None:
        if self.closed:
            return self.receipt
        self.closed = True
        labels = {**self.labels, "model": self._model(model)}
        for attempt in range(SETTLE_ATTEMPTS):
            try:
                try:
                    self.receipt = await self.meter.settle(
                        self.account, self.hold_id, usage.total, request_id=self._rid,
                        input_tokens=usage.input_tokens, output_tokens=usage.output_tokens, **labels)
                except UnknownHold:  # expired (a stream longer than its hold): charge it all the same
                    self.receipt = await self.meter.record_usage(
                        self.account, usage.total, request_id=f"px-late:{self.hold_id}",
                        input_tokens=usage.input_tokens, output_tokens=usage.output_tokens, **labels)
                PROXIED.labels(self.vendor, "settled" if reported else "estimated").inc()
                return self.receipt
            except (StoreUnavailable, OutcomeUnknown):
                if attempt + 1 < SETTLE_ATTEMPTS:
                    await asyncio.sleep(0.1 * 2**attempt)
            except MeterError as exc:
                log.error("proxy: settling hold %s of %s failed: %s", self.hold_id, self.account, exc)
                break
        PROXIED.labels(self.vendor, "unsettled").inc()
        log.error("proxy: hold %s of %s (%d tokens used) could not be settled; it is released at expiry",
                  self.hold_id, self.account, usage.total)
        return None

    async def release(self) -> None:
        if self.closed:
            return
        self.closed = True
        for attempt in range(SETTLE_ATTEMPTS):
            try:
                self.receipt = await self.meter.release(self.account, self.hold_id, request_id=self._rid)
                PROXIED.labels(self.vendor, "released").inc()
                return
            except (StoreUnavailable, OutcomeUnknown):
                if attempt + 1 < SETTLE_ATTEMPTS:
                    await asyncio.sleep(0.1 * 2**attempt)
            except MeterError as exc:  # unknown hold: it expired, and expiry released it
                log.warning("proxy: releasing hold %s of %s: %s", self.hold_id, self.account, exc)
                return
        log.error("proxy: hold %s of %s could not be released now; it is released at expiry",
                  self.hold_id, self.account)

    def in_background(self, closing: Any) -> asyncio.Task[Any]:
        """Run a closing coroutine in its own task (a cancelled request cannot stop it halfway);
        the app awaits these at shutdown."""
        task = asyncio.get_running_loop().create_task(closing)
        self.tasks.append(task)
        task.add_done_callback(lambda t: self.tasks.remove(t) if t in self.tasks else None)
        return task


def response_headers(upstream: httpx.Response, ours: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The upstream's headers (but hop-by-hop ones and its own rate-limit figures), then ours."""
    mine = {name for name, _ in ours}
    kept = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in upstream.headers.items()
            if k.lower() not in DROPPED_RESPONSE_HEADERS and not k.lower().startswith(("x-ratelimit-", "ratelimit"))]
    return [(k, v) for k, v in kept if k not in mine] + ours


class ProxiedStream(Response):
    """A streamed upstream answer passed on chunk by chunk (nothing buffered). While it pumps,
    a watcher waits for the client's disconnect; whichever ends first decides how the hold
    closes, and that closing runs in its own task."""

    def __init__(self, upstream: httpx.Response, headers: list[tuple[bytes, bytes]], tap: StreamTap,
                 call: MeteredCall) -> None:
        self.status_code = upstream.status_code
        self.raw_headers = headers
        self.background = None
        self.upstream, self.tap, self.call = upstream, tap, call

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        outcome = "broken"  # the upstream failed mid-stream, unless we learn otherwise

        async def pump() -> None:
            nonlocal outcome
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            try:
                async for chunk in self.upstream.aiter_raw():
                    self.tap.feed(chunk)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except httpx.HTTPError as exc:
                log.warning("proxy: upstream stream broke: %s", type(exc).__name__)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            outcome = "done"
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        pumping = asyncio.ensure_future(pump())
        watching = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
            if not pumping.done() or pumping.exception() is not None:  # gone, or a send to it failed
                outcome = "disconnected"
        except BaseException:
            outcome = "disconnected"
            raise
        finally:
            pumping.cancel()
            watching.cancel()
            await asyncio.shield(self.call.in_background(self._close(outcome)))

    async def _close(self, outcome: str) -> None:
        """Settle what the upstream reported (else the estimate of what was streamed); release
        when the upstream failed before any output."""
        with contextlib.suppress(Exception):  # closing a broken connection: nothing more to learn from it
            await self.upstream.aclose()
        self.tap.close()
        usage, reported = self.tap.best_usage(self.call.estimate.input_tokens)
        if outcome != "disconnected" and not reported and (self.tap.error or outcome == "broken") \
                and self.tap.text_bytes == 0:
            await self.call.release()  # nothing was produced: the upstream failed
            return
        if outcome == "disconnected" and not reported and self.tap.text_bytes == 0 and usage.output_tokens == 0:
            usage = Usage(usage.input_tokens, 0)  # the prompt was sent and read: that is charged
        await self.call.settle(usage, reported, self.tap.model)
