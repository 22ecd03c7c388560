"""The database handle: one async engine (asyncpg on Postgres, aiosqlite for the embedded default)."""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import exc as saexc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

__all__ = ["Database", "DatabaseMisconfigured", "is_configuration_error", "is_transient", "normalize_url"]

log = logging.getLogger("tokenmeter.db")


def normalize_url(url: str) -> str:
    """Accept postgres://, postgresql://, sqlite:///path or a bare file path; pick the async driver."""
    if "://" not in url:
        return f"sqlite+aiosqlite:///{Path(url).expanduser()}"
    u = make_url(url)
    if u.drivername in ("postgres", "postgresql", "postgresql+psycopg2", "postgresql+psycopg"):
        u = u.set(drivername="postgresql+asyncpg")
    elif u.drivername == "sqlite":
        u = u.set(drivername="sqlite+aiosqlite")
    return u.render_as_string(hide_password=False)


# SQLSTATEs of faults that pass: connection (08), restart or shutdown under way (57P01 admin
# shutdown, 57P02 crash shutdown, 57P03 "the database system is starting up" / "not yet
# accepting connections"), resources (53: too many clients, out of memory, disk full),
# transaction rollback (40001 serialization, 40P01 deadlock).
_TRANSIENT_SQLSTATE_PREFIXES = ("08", "53", "57P01", "57P02", "57P03", "40001", "40P01")
# Faults no wait cures: authentication (28), database does not exist (3D000).
_CONFIG_SQLSTATE_PREFIXES = ("28", "3D000", "42P01", "42703")  # + the schema not migrated (no table/column)
_SQLITE_CONFIG_MESSAGES = ("no such table", "no such column", "unable to open database file",
                           "file is not a database")


class DatabaseMisconfigured(Exception):
    """The database refuses us for good (bad URL, authentication, no such database)."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, what it wraps (SQLAlchemy's .orig) and its causes, a few levels deep."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo and len(seen) < 12:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        orig = getattr(e, "orig", None)
        todo += [orig if isinstance(orig, BaseException) else None, e.__cause__, e.__context__]


def _sqlstate(e: BaseException) -> str:
    return str(getattr(e, "sqlstate", "") or getattr(e, "pgcode", "") or "")


def is_configuration_error(exc: BaseException) -> bool:
    """A fault that waiting does not cure: a bad URL or driver, an authentication failure, a
    database that does not exist."""
    for e in _chain(exc):
        if isinstance(e, saexc.ArgumentError | saexc.NoSuchModuleError | DatabaseMisconfigured):
            return True
        if _sqlstate(e).startswith(_CONFIG_SQLSTATE_PREFIXES):
            return True
        # SQLite says it in words (an OperationalError like "database is locked", which passes)
        if isinstance(e, sqlite3.Error) and str(e).startswith(_SQLITE_CONFIG_MESSAGES):
            return True
    return False


def is_transient(exc: BaseException) -> bool:
    """A database fault worth waiting out (connection refused or reset, the server starting up
    or shutting down, too many clients, a serialization failure), however the driver or
    SQLAlchemy wraps it. Raw asyncpg errors count too: the ledger's COPY path talks to asyncpg
    directly, and SQLAlchemy passes a refused connect through unwrapped."""
    if is_configuration_error(exc):
        return False
    for e in _chain(exc):
        if isinstance(e, OSError | TimeoutError | ConnectionError):
            return True
        if isinstance(e, saexc.OperationalError | saexc.InterfaceError | sqlite3.OperationalError):
            return True  # (what configures nothing: the configuration errors were ruled out above)
        if isinstance(e, saexc.DBAPIError) and e.connection_invalidated:
            return True
        if _sqlstate(e).startswith(_TRANSIENT_SQLSTATE_PREFIXES):
            return True
        # asyncpg's client-side connection faults carry no SQLSTATE
        if type(e).__name__ in ("ConnectionDoesNotExistError", "InterfaceError", "InternalClientError") \
                and type(e).__module__.startswith("asyncpg"):
            return "closed" in str(e) or "does not exist" in str(e) or "connection" in str(e).lower()
    return False


def _create_private(path: str | None) -> None:
    """Create the SQLite file readable by its owner only (0600) before SQLite opens it: it holds
    password hashes and every user's history. SQLite gives its -wal and -shm files the same mode."""
    if not path or path == ":memory:" or path.startswith("file:"):
        return
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        if os.stat(path).st_mode & 0o077:
            log.warning("the SQLite database %s is readable by other users; chmod 600 it", path)
    except OSError:
        pass  # a directory that does not exist: SQLite reports it when it opens the file


class Database:
    """An async engine and session factory for one database URL."""

    def __init__(self, url: str, *, pool_size: int = 10, echo: bool = False) -> None:
        self.url = normalize_url(url)
        self.dialect = make_url(self.url).get_backend_name()  # "postgresql" or "sqlite"
        kwargs: dict[str, object] = {"echo": echo, "pool_pre_ping": True}
        if self.dialect == "postgresql":
            kwargs.update(pool_size=pool_size, max_overflow=pool_size)
        else:
            kwargs.update(connect_args={"timeout": 30})
        self.engine: AsyncEngine = create_async_engine(self.url, **kwargs)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False, class_=AsyncSession)
        if self.dialect == "sqlite":
            from sqlalchemy import event

            _create_private(make_url(self.url).database)

            @event.listens_for(self.engine.sync_engine, "connect")
            def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.close()

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"

    async def close(self) -> None:
        await self.engine.dispose()
