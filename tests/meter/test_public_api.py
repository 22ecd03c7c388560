"""Each public module exposes a sorted `__all__` whose names exist."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import meter

pytestmark = pytest.mark.unit

def _isort_key(name: str) -> tuple[int, str]:
    """The order ruff (RUF022) keeps: CONSTANTS, then Classes, then functions."""
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


MODULES = ["meter", *[f"meter.{m.name}" for m in pkgutil.iter_modules(meter.__path__)]]


@pytest.mark.parametrize("name", MODULES)
def test_all_is_sorted_and_resolves(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    assert list(exported) == sorted(exported, key=_isort_key), f"{name}.__all__ is not sorted"
    for attr in exported:
        assert hasattr(module, attr), f"{name}.__all__ names missing {attr}"


def test_pure_modules_import_no_io_libraries() -> None:
    import subprocess
    import sys

    code = ("import sys; import meter._catalog, meter._clock, meter.keys, meter._reference, "
            "meter._types, meter._validate; "
            "print(sorted(m for m in ('redis', 'sqlalchemy', 'fakeredis') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
