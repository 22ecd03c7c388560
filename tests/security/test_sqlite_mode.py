"""Finding 11 (part): the embedded default's SQLite file (password hashes, every user's history)
was created world-readable under the usual umask. It is created 0600, and so are its WAL files."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from tests.api.conftest import make_settings, running_app


async def test_the_sqlite_file_is_private(tmp_path: Any) -> None:
    path = Path(tmp_path) / "private.sqlite3"
    old = os.umask(0o022)  # the usual umask: files 0644 unless created otherwise
    try:
        async with running_app(make_settings(tmp_path, database_url=f"sqlite:///{path}")) as api:
            _, auth = await api.register()
            assert (await api.client.get("/api/v1/tokens/balance", headers=auth)).status_code == 200
            files = [p for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists()]
            assert Path(f"{path}-wal") in files  # WAL mode: the database is in use
            for p in files:
                assert stat.S_IMODE(p.stat().st_mode) == 0o600, (p, oct(p.stat().st_mode))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
