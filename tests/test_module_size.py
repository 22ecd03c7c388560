"""No module of the service, the library or the load tests over 400 lines (issue 11): past
that, a module holds more than one idea. Tests are exempt (a test file follows its subject)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("meter", "api", "persistence", "loadtests")
MAX_LINES = 400


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_is_at_most_400_lines() -> None:
    modules = _modules()
    assert len(modules) > 50  # the listing found the code (not an empty checkout)
    over = {str(p.relative_to(ROOT)): n for p in modules if (n := len(p.read_text("utf-8").splitlines())) > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines: {over}"
