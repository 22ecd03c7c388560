"""docker-compose.yml as deployed: long-running services restart by themselves, the schema is
migrated once by a one-shot service that the API and the flusher wait for, and the flusher has a
fixed consumer name (a restart re-reads its own pending entries at once)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = [pytest.mark.unit]

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"
LONG_RUNNING = ("redis", "postgres", "tokenmeter", "flusher")


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text())["services"])


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_long_running_services_restart(services: dict[str, Any], name: str) -> None:
    assert services[name].get("restart") in ("always", "unless-stopped", "on-failure")


def test_a_one_shot_migrate_service_runs_first(services: dict[str, Any]) -> None:
    migrate = services["migrate"]
    assert migrate["command"][-1] == "migrate" and "tokenmeter" in migrate["command"]
    assert migrate.get("restart", "no") == "no"  # one shot: done once, not restarted
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("tokenmeter", "flusher"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        # the migration already ran: these must not race each other to run it again
        assert str(services[name]["environment"]["TOKENMETER_MIGRATE_ON_START"]).lower() == "false"


def test_the_flusher_has_a_fixed_consumer_name(services: dict[str, Any]) -> None:
    command = services["flusher"]["command"]
    assert "--consumer" in command
    name = command[command.index("--consumer") + 1]
    assert name and "$" not in name  # fixed, not generated per start
    assert services["flusher"]["environment"]["TOKENMETER_FLUSHER"] == "external"
    assert services["tokenmeter"]["environment"]["TOKENMETER_FLUSHER"] == "external"  # one flusher kind


def test_the_flusher_exposes_metrics(services: dict[str, Any]) -> None:
    command = services["flusher"]["command"]
    assert int(command[command.index("--metrics-port") + 1]) > 0
    assert command[command.index("--metrics-host") + 1] == "0.0.0.0"  # reachable by a scraper
