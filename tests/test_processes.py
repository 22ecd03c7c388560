"""tests/processes.py stops what a test starts, whatever it ignores: a server that ignores SIGINT
(as every process of a suite run in the background does) and its children are gone afterwards."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.processes import running, start_process, stop_process

pytestmark = [pytest.mark.unit]

# A parent that ignores SIGINT and SIGTERM (optionally) and starts a child that sleeps: like
# `dev.py serve` running `tokenmeter serve`, started from a backgrounded suite.
PARENT = """
import signal, subprocess, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
if sys.argv[2] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by init) counts as gone
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ", 1)[1].startswith("Z"))


def _child_pid(path: Path) -> int:
    for _ in range(200):
        if path.exists() and path.read_text():
            return int(path.read_text())
        time.sleep(0.05)
    raise AssertionError("the child did not start")


@pytest.mark.parametrize("kind", ["polite", "stubborn"])
def test_stop_process_ends_the_process_and_its_children(tmp_path: Path, kind: str) -> None:
    pidfile = tmp_path / "child.pid"
    proc = start_process([sys.executable, "-c", PARENT, str(pidfile), kind])
    child = _child_pid(pidfile)
    proc.send_signal(signal.SIGINT)  # what the old tests relied on: ignored here
    time.sleep(0.2)
    assert proc.poll() is None
    code = stop_process(proc, grace_s=1.0)
    assert code == (-signal.SIGKILL if kind == "stubborn" else -signal.SIGTERM)
    for _ in range(50):
        if not _alive(child):
            break
        time.sleep(0.05)
    assert not _alive(child), "the server's child outlived the test"


def test_running_stops_the_process_when_the_block_fails(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    with pytest.raises(RuntimeError), running([sys.executable, "-c", PARENT, str(pidfile), "polite"],
                                              grace_s=1.0) as proc:
        child = _child_pid(pidfile)
        raise RuntimeError("the test failed")
    assert proc.poll() is not None
    for _ in range(50):
        if not _alive(child):
            break
        time.sleep(0.05)
    assert not _alive(child)
