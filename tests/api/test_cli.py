"""The tokenmeter command line against the real Redis and a SQLite database."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import REDIS_URL, MeterFactory

pytestmark = [pytest.mark.redis, pytest.mark.usefixtures("real_redis")]


async def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "api.cli", *args], env=env,
                                   capture_output=True, text=True, timeout=60)


async def test_admin_commands_and_api_keys(make_meter: MeterFactory, tmp_path: Any) -> None:
    meter = await make_meter("redis")
    await meter.open_account("cli-user")
    env = {**os.environ, "REDIS_URL": REDIS_URL, "DATABASE_URL": f"sqlite:///{tmp_path / 'cli.sqlite3'}",
           "TOKENMETER_KEY_PREFIX": meter.prefix}
    r = await cli(env, "admin", "grant", "cli-user", "5000", "--bucket", "premium", "--reason", "goodwill")
    assert r.returncode == 0, r.stderr
    r = await cli(env, "admin", "adjust", "cli-user", "7000", "--bucket", "premium", "--reason", "oops")
    assert r.returncode == 0 and "took back 5000, owed 2000" in r.stdout, r.stdout + r.stderr
    r = await cli(env, "admin", "set-plan", "cli-user", "basic", "--reason", "trial")
    assert r.returncode == 0 and '"effective": "now"' in r.stdout, r.stdout + r.stderr
    bal = await meter.balance("cli-user")
    assert (bal.plan, bal.premium_tokens, bal.monthly_remaining) == ("basic", 0, 50_000)
    r = await cli(env, "apikey", "create", "--name", "edge", "--scopes", "meter")
    assert r.returncode == 0 and "tmk_" in r.stdout
    key_id = r.stdout.split("id: ")[1].split()[0]
    assert (await cli(env, "apikey", "revoke", key_id)).returncode == 0
    assert (await cli(env, "apikey", "create", "--name", "x", "--scopes", "root")).returncode == 2
    r = await cli(env, "admin", "promo-create", "CLI10", "10", "--max", "3")
    assert r.returncode == 0
    assert (await cli(env, "admin", "promo-disable", "CLI10")).returncode == 0
    r = await cli(env, "balance", "cli-user")
    assert r.returncode == 0 and '"plan": "basic"' in r.stdout
