#!/usr/bin/env python3
"""Bootstrap and task runner: needs only Python 3.11+ on the machine.

    python3 dev.py serve [args]         run the service (embedded Redis + SQLite unless configured);
                                        --port N (default 8000), --host ADDR (default 127.0.0.1)
    python3 dev.py tokenmeter CMD ...   the `tokenmeter` command line (apikey, migrate, flusher, ...)
    python3 dev.py test [pytest args]   lint, type-check and run the test suite
    python3 dev.py bench [args]         `tokenmeter bench`: the benchmarks side by side (--quick, --only ...)
    python3 dev.py shell CMD ...        run CMD inside the project's virtualenv

The first call creates `.venv/` and installs the project with its dev extras; later calls
reinstall only when pyproject.toml changes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".tokenmeter-installed"


def _run(*cmd: str | Path, cwd: Path = ROOT) -> int:
    return subprocess.call([str(c) for c in cmd], cwd=cwd)


def ensure_venv() -> None:
    """Create the virtualenv and (re)install the project when its metadata changed."""
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == want:
        return
    if not (BIN / "python").exists():
        print("dev.py: creating .venv", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("dev.py: installing tokenmeter with dev extras into .venv", flush=True)
    rc = _run(BIN / "python", "-m", "pip", "install", "-q", "--upgrade", "pip")
    rc = rc or _run(BIN / "python", "-m", "pip", "install", "-q", "-e", ".[dev]")
    if rc:
        sys.exit(f"dev.py: installation failed (exit {rc})")
    STAMP.write_text(want)


def test(args: list[str]) -> int:
    steps = [
        ("ruff", [BIN / "ruff", "check", "meter", "api", "persistence", "loadtests", "tests"]),
        ("mypy", [BIN / "mypy", "meter", "api", "persistence"]),
    ]
    for name, cmd in steps:
        print(f"dev.py: {name}", flush=True)
        if rc := _run(*cmd):
            print(f"dev.py: {name} failed", flush=True)
            return rc
    rc = _run(BIN / "python", "-m", "pytest", *args)
    if rc == 5:  # pytest: no tests collected. That is a failure, never a pass.
        print("dev.py: pytest collected no tests", flush=True)
        return 1
    return rc


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(__doc__)
        return 0
    ensure_venv()
    cmd, rest = argv[0], argv[1:]
    if cmd == "test":
        return test(rest)
    if cmd == "serve":
        try:  # from the caller's directory: that is where the SQLite file goes
            return _run(BIN / "tokenmeter", "serve", *rest, cwd=Path.cwd())
        except KeyboardInterrupt:
            return 0
    if cmd == "tokenmeter":  # from the caller's directory, like serve: the same SQLite file
        return _run(BIN / "tokenmeter", *rest, cwd=Path.cwd())
    if cmd == "bench":
        return _run(BIN / "tokenmeter", "bench", *rest, cwd=Path.cwd())
    if cmd == "shell":
        return _run(BIN / rest[0], *rest[1:]) if (BIN / rest[0]).exists() else _run(*rest)
    print(f"dev.py: unknown command {cmd!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
