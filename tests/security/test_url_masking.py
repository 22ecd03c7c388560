"""Finding 9 (logging): `serve` printed DATABASE_URL and REDIS_URL with their passwords. One
helper (api.redact.mask_url) masks credentials wherever a URL is printed or logged."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from api.redact import mask_url

ROOT = Path(__file__).resolve().parents[2]
REDIS_SECRET, PG_SECRET = "r3dis-pa55-Zq", "pg-pa55-Xw"


async def test_serve_prints_and_logs_no_url_password(tmp_path: Any) -> None:
    """The real `serve` on URLs whose services are not there (port 1): the banner, then the start-up
    failure's log and traceback; neither password may appear anywhere in what it writes."""
    env = {**os.environ, "REDIS_URL": f"redis://admin:{REDIS_SECRET}@127.0.0.1:1/0",
           "DATABASE_URL": f"postgresql://tm:{PG_SECRET}@127.0.0.1:1/tm", "PYTHONPATH": str(ROOT)}
    env.pop("TOKENMETER_MASTER_KEY", None)
    r = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "api.cli", "serve", "--port", "1"],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    assert "redis://admin:***@127.0.0.1:1/0" in r.stdout and "postgresql://tm:***@127.0.0.1:1/tm" in r.stdout, out
    assert REDIS_SECRET not in out and PG_SECRET not in out, out


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:pw@cache:6379/0", "redis://:***@cache:6379/0"),
    ("rediss://default:pw@cache:6380", "rediss://default:***@cache:6380"),
    ("redis://pw@cache", "redis://***@cache"),  # a lone redis userinfo is the password
    ("postgresql://tm:p%40ss@db:5432/tm", "postgresql://tm:***@db:5432/tm"),
    ("postgresql://tm:p@ss@db/tm", "postgresql://tm:***@db/tm"),
    ("postgresql://db/tm?sslmode=require&password=pw", "postgresql://db/tm?sslmode=require&password=***"),
    ("postgresql://tm@db/tm", "postgresql://tm@db/tm"),
    ("sqlite:///tokenmeter.sqlite3", "sqlite:///tokenmeter.sqlite3"),
    ("fakeredis://", "fakeredis://"),
])
def test_mask_url(url: str, shown: str) -> None:
    assert mask_url(url) == shown
