"""The Locust smoke run (`tokenmeter loadtest`), bounded: 12 users for 10 s against a service it
starts (on the real Redis when reachable), then the books; the run's own check must pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import CI, REAL_REDIS, REDIS_URL

ROOT = Path(__file__).resolve().parent.parent


def test_loadtest_smoke_run_keeps_the_books(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "api.cli", "loadtest", "--users", "12", "--spawn-rate", "12", "--run-time", "10",
           "--accounts", "60", "--out", str(tmp_path)]
    if REAL_REDIS or CI:
        cmd += ["--redis-url", REDIS_URL]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "loadtest: PASS" in out, out[-4000:]
    summary = next(line for line in out.splitlines() if line.startswith("loadtest: ") and "accounts, answers" in line)
    # allowed calls, the dry accounts refused, the hot accounts at their daily cap
    assert "'200'" in summary and "'402'" in summary and "'429'" in summary
    assert (tmp_path / "report.html").exists() and (tmp_path / "locust_stats.csv").exists()
