"""Helpers of the Redis-loss tests: a private redis-server with AOF (killed, cut and restarted
by the test), a meter that rehydrates from the ledger, and the books: ledger rows and dead letters."""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import socket
import subprocess
import time
from typing import Any

import redis
from sqlalchemy import select

from meter import FakeClock, Meter
from persistence.flusher import Flusher, FlusherConfig, dead_letter_key
from persistence.ledger import LedgerWriter
from persistence.models import TokenTransaction
from persistence.rehydrate import SnapshotLoader

REDIS_SERVER = "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """redis-server on its own loopback port and directory, `appendfsync always` (so every
    acknowledged write is in the AOF and the test decides what a crash loses)."""

    def __init__(self, directory: str) -> None:
        self.dir, self.port = directory, free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
             "--appendonly", "yes", "--appendfsync", "always", "--aof-load-truncated", "yes",
             "--save", "", "--maxmemory-policy", "noeviction", "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        for _ in range(100):  # bounded: 10 s
            with contextlib.suppress(redis.RedisError):
                if client.ping() and client.info("persistence")["loading"] == 0:
                    client.close()
                    return
            time.sleep(0.1)
        raise RuntimeError("private redis-server did not start")

    def incr_aof(self) -> str:
        """Redis 7: appendonlydir/<name>.<n>.incr.aof, the file every write is appended to."""
        (path,) = glob.glob(os.path.join(self.dir, "appendonlydir", "*.incr.aof"))
        return path

    def kill(self) -> None:
        """SIGKILL: a host crash, as far as Redis can tell."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@contextlib.asynccontextmanager
async def private_redis_server(directory: str) -> Any:
    """A started PrivateRedis, stopped and gone in every outcome."""
    server = PrivateRedis(directory)
    try:
        server.start()
        yield server
    finally:
        server.stop()


async def loss_meter(url: str, database: Any, clock: FakeClock, prefix: str = "tmloss", **options: Any) -> Meter:
    meter = await Meter.connect(url, prefix=prefix, shards=4, clock=clock, timeout_ms=2000,
                                connect_timeout_ms=2000, **options)
    meter.loader = SnapshotLoader(database, meter.store.redis, meter.catalog,  # type: ignore[attr-defined]
                                  shards=meter.shards, prefix=meter.prefix, clock=clock,
                                  idempotency_ttl_s=meter.idempotency_ttl_s)
    return meter


def flusher(meter: Meter, database: Any, client: Any = None) -> Flusher:
    """A flusher of the meter's streams (on `client`: a fresh one after a Redis restart, since
    drain() does not ride out a dropped connection as run() does)."""
    return Flusher(client or meter.store.redis, LedgerWriter(database, meter.catalog),  # type: ignore[attr-defined]
                   shards=meter.shards, prefix=meter.prefix, config=FlusherConfig(block_ms=10))


async def ledger_rows(database: Any, account_id: str) -> list[Any]:
    async with database.sessions() as session:
        q = select(TokenTransaction).where(TokenTransaction.account_id == account_id).order_by(TokenTransaction.seq)
        return list((await session.execute(q)).scalars())


async def dead_letters(meter: Meter) -> int:
    return int(await meter.store.redis.xlen(dead_letter_key(meter.prefix)))  # type: ignore[attr-defined]


async def forget_verified(redis: Any, live: str) -> None:
    """As a Redis restart does: no account of the shard counts as verified any more (the set the
    scripts use is `live` + ':' + the server's run_id)."""
    found = [k async for k in redis.scan_iter(match=f"{live}*")]
    if found:
        await redis.delete(*found)
