"""Servers a reliability test owns: a redis-server and a PostgreSQL cluster on free loopback
ports, in temporary directories, that the test may FLUSHALL, stop (`-m immediate`) and start
again; always stopped and removed afterwards (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.processes import free_port, start_process, stop_process

__all__ = ["PrivatePostgres", "PrivateRedis", "private_postgres", "private_redis"]

PG_BIN = Path("/usr/lib/postgresql/15/bin")


async def _wait_port(port: int, tries: int = 200) -> None:
    for _ in range(tries):
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


class PrivateRedis:
    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.dir = directory
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        self.proc = start_process([server, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.dir),
                                   "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
                                   "--daemonize", "no"])
        await _wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


class PrivatePostgres:
    """initdb + pg_ctl as the postgres user (initdb refuses root) on a free port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="tm-pg-"))
        self.data = self.dir / "data"

    def _as_postgres(self, *cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return subprocess.run([*prefix, *cmd], capture_output=True, text=True, check=check, timeout=timeout)

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def init(self) -> None:
        if not (PG_BIN / "initdb").exists():
            pytest.fail(f"PostgreSQL 15 is not installed at {PG_BIN}")
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self._as_postgres(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                          "--no-sync", "-E", "UTF8")

    def start(self, *, refusing: bool = False) -> None:
        """Start; with `refusing`, as a standby without hot standby: up, but every connection
        gets 57P03 "the database system is not accepting connections" (asyncpg's
        CannotConnectNowError, as while a restarted server recovers) until `promote()`."""
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=60"
        if refusing:
            opts += " -c hot_standby=off"
            self._as_postgres("touch", str(self.data / "standby.signal"))
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log"),
                          "-w", "-t", "60", "start")

    def promote(self) -> None:
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60", "promote")

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop",
                          check=False)

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    async def create_database(self, name: str) -> str:
        import asyncpg

        conn = await asyncpg.connect(self.admin_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return self.url(name)


@contextlib.asynccontextmanager
async def private_redis(directory: Path) -> AsyncIterator[PrivateRedis]:
    server = PrivateRedis(directory)
    try:
        await server.start()
        yield server
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def private_postgres() -> AsyncIterator[PrivatePostgres]:
    cluster = PrivatePostgres()
    try:
        await asyncio.to_thread(cluster.init)
        await asyncio.to_thread(cluster.start)
        yield cluster
    finally:
        await asyncio.to_thread(cluster.remove)
