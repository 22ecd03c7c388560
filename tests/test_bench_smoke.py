"""`tokenmeter bench` end to end, short: the script and meter sections on the private
redis-server it starts, as a subprocess; the JSON must hold every figure, each a positive
number. Never a wall-clock or a ratio asserted: only that each was measured."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests.bench_report import ratios, table
from tests.conftest import CI

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("redis-server", "redis-benchmark")


def _bench(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[dict, str]:
    if missing := [t for t in TOOLS if shutil.which(t) is None]:
        if CI:
            pytest.fail(f"CI=true but {missing} not installed (Debian packages redis-server, redis-tools)")
        pytest.skip(f"{missing} not installed")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "api.cli", "bench", "--quick", "--seconds", "1", "--out", str(out), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    text = p.stdout + p.stderr
    assert p.returncode == 0, text[-4000:]
    return json.loads((out / "bench.json").read_text()), text


def _positive(doc: dict, *path: str) -> None:
    node = doc
    for p in path:
        assert p in node, f"{'.'.join(path)} missing from bench.json"
        node = node[p]
    assert isinstance(node, int | float) and node > 0, f"{'.'.join(path)} = {node!r}"


def test_bench_quick_script_and_meter_write_every_figure(tmp_path: Path) -> None:
    doc, text = _bench(tmp_path, "--only", "script,meter")
    assert doc["meta"]["sections"] == ["script", "meter"] and doc["meta"]["quick"] is True
    assert doc["meta"]["redis"].startswith("private")
    for run in ("debit_c", "debit_p16", "trivial_c", "trivial_p16"):
        for key in ("rps", "usec_per_call", "evalsha_per_decision", "redis_cpu_usec_per_decision"):
            _positive(doc, "sections", "script", run, key)
    for key in ("rps", "decisions", "usec_per_call", "redis_cpu_usec_per_decision"):
        _positive(doc, "sections", "meter", "debit", key)
    for key in ("debit_script_vs_trivial_usec", "meter_vs_redis_benchmark", "meter_vs_redis_benchmark_p16"):
        _positive(doc, "ratios", key, "value")
    out = tmp_path / "out"
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "meter.debit / redis-benchmark -c 50" in (out / "bench.txt").read_text()
    assert "ratios, both sides measured in this run" in text


def test_bench_without_wrk_skips_http_and_says_so(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"  # a PATH with the Redis tools and no wrk
    bindir.mkdir()
    for tool in TOOLS:
        if exe := shutil.which(tool):
            (bindir / tool).symlink_to(exe)
    doc, text = _bench(tmp_path, "--only", "http", env={"PATH": str(bindir)})
    assert "wrk not installed" in doc["sections"]["http"]["skipped"]
    assert "http" in text and "skipped: wrk not installed" in text


def test_report_handles_partial_results() -> None:
    """The table and the ratios take whatever sections ran (here: made-up figures, two sections)."""
    run = {"rps": 2.0, "usec_per_call": 4.0, "clients": 50, "pipeline": 1, "evalsha_per_decision": 1.0,
           "redis_cpu_usec_per_decision": 5.0}
    results = {"script": {"debit_c": run, "trivial_c": {**run, "usec_per_call": 1.0}},
               "limits": {"fixed_window": {**run, "rps": 1.0}}, "http": {"skipped": "wrk not installed"}}
    rs = ratios(results)
    assert rs["debit_script_vs_trivial_usec"]["value"] == 4.0
    assert "meter_vs_limits_fixed_window" not in rs  # the meter did not run: no ratio
    text = table(results, {"started": "now", "machine": "m", "redis": "r"})
    assert "http             skipped: wrk not installed" in text
