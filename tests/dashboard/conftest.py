"""Fixtures of the dashboard tests: the in-process app (tests/api) for the route tests, and for
the browser test the real service (tests/dashboard/service.py) and Debian's Chromium driven by
Playwright (never a downloaded browser). Without Chromium or Playwright the browser test is
skipped with the reason; with CI=true it fails instead."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.api.conftest import api  # noqa: F401  (a fixture)
from tests.conftest import CI
from tests.dashboard.service import Service

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def _unavailable(reason: str) -> None:
    if CI:
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Debian Chromium under Playwright's sync API."""
    if not Path(CHROMIUM).is_file():
        _unavailable(f"{CHROMIUM} is missing (apt-get install chromium; .ci/run installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (it is in the dev extras: pip install -e .[dev])")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    """The real service; 3 failed promo attempts per window (so the test reaches the limit)."""
    svc = Service(tmp_path, TOKENMETER_PROMO_MAX_FAILURES="3")
    try:
        svc.start()
        yield svc
    finally:
        svc.cleanup()


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    """Where the screenshots go: $TOKENMETER_ARTIFACTS/dashboard, else the test's tmp_path."""
    root = Path(os.environ["TOKENMETER_ARTIFACTS"]) if os.environ.get("TOKENMETER_ARTIFACTS") else tmp_path
    out = root / "dashboard"
    out.mkdir(parents=True, exist_ok=True)
    return out
