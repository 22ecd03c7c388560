"""The in-process app fixture of tests/api, for the request-shape tests."""

from tests.api.conftest import api  # noqa: F401  (a fixture)
