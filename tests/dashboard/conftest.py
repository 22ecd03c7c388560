"""Fixtures of the dashboard tests: the in-process app (tests/api) for the route tests."""

from tests.api.conftest import api  # noqa: F401  (a fixture)
