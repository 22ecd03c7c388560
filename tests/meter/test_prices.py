"""The price table: real model names matched exactly or as dated aliases, integer costs with
cached input, unknown labels accepted and flagged, and the strict mode that refuses them."""

from __future__ import annotations

import dataclasses

import pytest

from meter import CatalogError, InvalidInput, Meter, default_catalog
from meter._catalog import parse_catalog
from tests.conftest import MeterFactory, journal_of

CATALOG = default_catalog()


@pytest.mark.parametrize(("name", "entry"), [
    ("gpt-4o-mini", "gpt-4o-mini"),
    ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),  # the longer entry wins over gpt-4o
    ("gpt-4o-2024-08-06", "gpt-4o"),
    ("GPT-4o", "gpt-4o"),
    ("openai/gpt-4.1-mini", "gpt-4.1-mini"),
    ("claude-3-5-sonnet-20241022", "claude-3-5-sonnet"),
    ("claude-3-5-sonnet@20240620", "claude-3-5-sonnet"),
    ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
    ("claude-sonnet-4-20250514", "claude-sonnet-4"),
    ("gemini-2.5-flash-lite-preview-06-17", "gemini-2.5-flash-lite"),
    ("mistral-large-latest", "mistral-large"),
    ("sonnet", "sonnet"),
])
def test_model_names_match_their_price_entry(name: str, entry: str) -> None:
    model = CATALOG.model(name)
    assert model is not None and model.id == entry


@pytest.mark.parametrize("name", ["gpt-4omini", "gpt-4", "llama-foo", "o", "claude", "my-agent-model"])
def test_other_names_are_unpriced(name: str) -> None:
    assert CATALOG.model(name) is None and not CATALOG.is_priced(name)
    assert CATALOG.cost_usd_micros(name, 1_000_000, 1_000_000) == 0


def test_cost_is_integer_micro_dollars_with_cached_input() -> None:
    # gpt-4o: 2.50 in, 10.00 out, 1.25 cached in, per million tokens
    assert CATALOG.cost_usd_micros("gpt-4o", 1_000_000, 1_000_000) == 12_500_000
    assert CATALOG.cost_usd_micros("gpt-4o", 1_000_000, 1_000_000, cached_tokens=500_000) == 11_875_000
    # cached above the input is capped at the input; rounding is half up on the micro-dollar
    assert CATALOG.cost_usd_micros("gpt-4o", 10, 0, cached_tokens=99) == CATALOG.cost_usd_micros("gpt-4o", 10, 0, 10)
    assert CATALOG.cost_usd_micros("gpt-4o-mini", 3, 1) == 1  # 0.45 + 0.6 = 1.05 micro-dollars
    # a model without a cached price prices cached input as input
    assert CATALOG.cost_usd_micros("gpt-4-turbo", 1_000, 0, 1_000) == CATALOG.cost_usd_micros("gpt-4-turbo", 1_000, 0)
    for m in CATALOG.models.values():
        assert all(isinstance(v, int) for v in (m.input_usd_micros_per_mtok, m.output_usd_micros_per_mtok))


def test_the_table_covers_four_families() -> None:
    names = set(CATALOG.models)
    assert {"gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet", "gemini-2.5-pro", "deepseek-chat"} <= names


def test_catalog_refuses_a_bad_model_id_and_a_bad_strict_flag() -> None:
    base = {
        "inr_paise_per_usd": 8300,
        "plans": {"free": {"monthly_tokens": 1, "price_inr_paise": 0}},
        "packs": {"p": {"tokens": 1, "price_inr_paise": 1}},
        "promo_codes": {"X": {"bonus_tokens": 1}},
        "agents": {"a": {"estimate_tokens": 1, "model": "m"}},
        "models": {"m": {"input_usd_micros_per_mtok": 1, "output_usd_micros_per_mtok": 1}},
    }
    assert parse_catalog(base).models["m"].cached_input_usd_micros_per_mtok is None
    with pytest.raises(CatalogError, match="model id"):
        parse_catalog({**base, "models": {"m m": {"input_usd_micros_per_mtok": 1, "output_usd_micros_per_mtok": 1}},
                       "agents": {}})
    with pytest.raises(CatalogError, match="strict_labels"):
        parse_catalog({**base, "strict_labels": "yes"})
    assert parse_catalog({**base, "strict_labels": True}).strict_labels is True


async def test_unknown_labels_are_accepted_and_journaled(backend: str, make_meter: MeterFactory) -> None:
    meter: Meter = await make_meter(backend)
    await meter.open_account("u1")
    d = await meter.debit("u1", 100, agent="support-bot", model="llama-3.2-3b-instruct", request_id="r1")
    assert d.allowed
    usage = [e for e in await journal_of(meter, "u1") if e.kind == "usage"]
    assert [(e.agent, e.model) for e in usage] == [("support-bot", "llama-3.2-3b-instruct")]


async def test_strict_mode_refuses_unknown_labels_and_changes_nothing(backend: str, make_meter: MeterFactory) -> None:
    meter: Meter = await make_meter(backend, catalog=dataclasses.replace(CATALOG, strict_labels=True))
    await meter.open_account("u1")
    for kwargs, field in (({"model": "llama-3.2-3b"}, "model"), ({"agent": "support-bot"}, "agent")):
        with pytest.raises(InvalidInput) as info:
            await meter.debit("u1", 100, **kwargs)
        assert info.value.field == field
    assert (await meter.debit("u1", 100, agent="code", model="gpt-4o-2024-08-06")).allowed  # known ones pass
    assert (await meter.balance("u1")).remaining_tokens == 10_000 - 100
