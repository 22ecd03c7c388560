"""Run the Alembic migrations programmatically (`tokenmeter migrate`), on Postgres or SQLite."""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection

from persistence.db import Database

__all__ = ["alembic_config", "current_revision", "downgrade", "upgrade"]


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", "persistence:migrations")
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


async def _run(db: Database, fn: str, revision: str) -> None:
    def go(connection: Connection) -> None:
        cfg = alembic_config()
        cfg.attributes["connection"] = connection
        getattr(command, fn)(cfg, revision)

    async with db.engine.begin() as conn:
        await conn.run_sync(go)


async def upgrade(db: Database, revision: str = "head") -> None:
    await _run(db, "upgrade", revision)


async def downgrade(db: Database, revision: str = "base") -> None:
    await _run(db, "downgrade", revision)


async def current_revision(db: Database) -> str | None:
    from alembic.runtime.migration import MigrationContext

    def get(connection: Connection) -> str | None:
        return MigrationContext.configure(connection).get_current_revision()

    async with db.engine.connect() as conn:
        return await conn.run_sync(get)
