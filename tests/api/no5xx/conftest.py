"""The live app, one per database for the whole package, and the operations each test runs over
(parametrized at collection from the app's schema: nothing is built when a module is imported)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.api.no5xx.live import Live, live_app
from tests.api.no5xx.schema import labels
from tests.conftest import DATABASES


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "operations(kind): parametrize `label` over the schema's operations "
                                       "of that kind (all, protected, with_input, mutating, payment_ops)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("operations")
    if marker is not None:
        metafunc.parametrize("label", labels(marker.args[0]))


@pytest.fixture(scope="package", params=DATABASES)
def live(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with live_app(request, tmp_path_factory.mktemp("fuzz"), database=request.param) as app:
        yield app
