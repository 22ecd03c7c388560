"""The catalog: plans, packs, promo codes, agents, model prices. One TOML file, validated on load."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from meter._errors import CatalogError, InvalidInput

__all__ = ["MAX_INT", "Agent", "Catalog", "Model", "Pack", "Plan", "PromoCode", "default_catalog",
           "load_catalog"]

MAX_INT = 2**53  # Lua numbers are doubles: every integer that reaches a script stays below this.


@dataclass(frozen=True, slots=True)
class Plan:
    id: str
    name: str
    monthly_tokens: int
    price_inr_paise: int
    daily_requests: int  # 0 = unlimited
    requests_per_minute: int  # 0 = off
    max_tokens_per_request: int
    rollover_pct: int


@dataclass(frozen=True, slots=True)
class Pack:
    id: str
    name: str
    tokens: int
    price_inr_paise: int
    popular: bool = False


@dataclass(frozen=True, slots=True)
class PromoCode:
    code: str
    bonus_tokens: int


@dataclass(frozen=True, slots=True)
class Agent:
    id: str
    name: str
    estimate_tokens: int
    model: str


@dataclass(frozen=True, slots=True)
class Model:
    id: str
    name: str
    input_usd_micros_per_mtok: int
    output_usd_micros_per_mtok: int
    cached_input_usd_micros_per_mtok: int | None = None  # None: cached input is priced as input


# A model or agent label the catalog does not know: accepted (priced 0, flagged `unpriced`)
# unless the catalog is strict. The ledger's columns hold 64 characters.
LABEL_RE = re.compile(r"[A-Za-z0-9._:/@+-]{1,64}")
_ALIAS_SEPARATORS = "-@:"  # gpt-4o-2024-08-06, claude-3-5-sonnet@20240620, ...:free


@dataclass(frozen=True, slots=True)
class Catalog:
    plans: dict[str, Plan]
    packs: dict[str, Pack]
    promo_codes: dict[str, PromoCode]
    agents: dict[str, Agent]
    models: dict[str, Model]
    inr_paise_per_usd: int
    project_estimate_tokens: int = 0  # 0 = the sum of the agents' estimates
    strict_labels: bool = False  # refuse unknown model and agent labels (422) instead of flagging them
    _by_lower: dict[str, Model] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_lower", {k.lower(): v for k, v in self.models.items()})

    def plan(self, plan_id: str) -> Plan:
        try:
            return self.plans[plan_id]
        except KeyError:
            raise InvalidInput("plan", f"unknown plan {plan_id!r}; known: {sorted(self.plans)}") from None

    def check_agent(self, agent: str | None) -> None:
        """A catalog agent, or (unless strict) any label of A-Z a-z 0-9 . _ : / @ + - up to 64."""
        if agent is None or agent in self.agents:
            return
        if self.strict_labels:
            raise InvalidInput("agent", f"unknown agent {agent!r}; known: {sorted(self.agents)}")
        if not isinstance(agent, str) or not LABEL_RE.fullmatch(agent):
            raise InvalidInput("agent", "must be 1-64 characters of A-Z a-z 0-9 . _ : / @ + -")

    def check_model(self, model: str | None) -> None:
        """A priced model (exact or dated alias), or (unless strict) any label as for agents."""
        if model is None or self.model(model) is not None:
            return
        if self.strict_labels:
            raise InvalidInput("model", f"unknown model {model!r}; known: {sorted(self.models)}")
        if not isinstance(model, str) or not LABEL_RE.fullmatch(model):
            raise InvalidInput("model", "must be 1-64 characters of A-Z a-z 0-9 . _ : / @ + -")

    def model(self, name: str) -> Model | None:
        """The price entry of a model name: exact (case-insensitive), else the longest catalog
        name that is a prefix ending at a separator (`gpt-4o-mini-2024-07-18` → `gpt-4o-mini`,
        `claude-3-5-sonnet-20241022` → `claude-3-5-sonnet`), also after a provider prefix
        (`openai/gpt-4o`). None when unpriced."""
        return _match_model(self._by_lower, name) if isinstance(name, str) else None

    def is_priced(self, model: str | None) -> bool:
        return model is None or self.model(model) is not None

    def cost_usd_micros(self, model: str, input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> int:
        """Estimated cost in micro-dollars, rounded half up. An unpriced model costs nothing.
        `cached_tokens` are the part of `input_tokens` read from the provider's prompt cache."""
        m = self.model(model)
        if m is None:
            return 0
        cached = min(max(cached_tokens, 0), input_tokens)
        cached_rate = m.input_usd_micros_per_mtok if m.cached_input_usd_micros_per_mtok is None \
            else m.cached_input_usd_micros_per_mtok
        scaled = ((input_tokens - cached) * m.input_usd_micros_per_mtok + cached * cached_rate
                  + output_tokens * m.output_usd_micros_per_mtok)
        return (scaled + 500_000) // 1_000_000

    def usd_micros_to_inr_paise(self, usd_micros: int) -> int:
        return (usd_micros * self.inr_paise_per_usd + 500_000) // 1_000_000


def _match_model(models: dict[str, Model], name: str) -> Model | None:
    low = name.lower()
    if "/" in low and low not in models:
        low = low.rsplit("/", 1)[1]
    exact = models.get(low)
    if exact is not None:
        return exact
    best: Model | None = None
    best_len = 0
    for known, m in models.items():  # a few dozen entries; only names outside the table get here
        n = len(known)
        if n > best_len and len(low) > n and low[n] in _ALIAS_SEPARATORS and low.startswith(known):
            best, best_len = m, n
    return best


# -- loading -------------------------------------------------------------------------------------


_PLAN_ID = re.compile(r"[A-Za-z0-9._-]{1,32}")


def _int(where: str, table: dict[str, Any], key: str, *, low: int = 0, default: int | None = None) -> int:
    value = table.get(key, default)
    if value is None:
        raise CatalogError(f"{where}.{key}: missing")
    if isinstance(value, bool) or not isinstance(value, int):
        raise CatalogError(f"{where}.{key}: must be an integer, got {value!r}")
    if not low <= value < MAX_INT:
        raise CatalogError(f"{where}.{key}: must be between {low} and 2^53, got {value}")
    return value


def _str(where: str, table: dict[str, Any], key: str, default: str | None = None) -> str:
    value = table.get(key, default)
    if not isinstance(value, str) or not value:
        raise CatalogError(f"{where}.{key}: must be a non-empty string, got {value!r}")
    return value


def _section(data: dict[str, Any], name: str) -> dict[str, dict[str, Any]]:
    section = data.get(name)
    if not isinstance(section, dict) or not section:
        raise CatalogError(f"[{name}]: missing or empty")
    for key, value in section.items():
        if not isinstance(value, dict):
            raise CatalogError(f"[{name}.{key}]: must be a table")
    return section


def parse_catalog(data: dict[str, Any]) -> Catalog:
    """Build a Catalog from parsed TOML, raising CatalogError that names the bad entry."""
    plans = {}
    for pid, t in _section(data, "plans").items():
        w = f"plans.{pid}"
        if not _PLAN_ID.fullmatch(pid):  # stored in Redis and the journal as a ':'-separated field
            raise CatalogError(f"[{w}]: a plan id is 1-32 of A-Z a-z 0-9 . _ -")
        plans[pid] = Plan(
            id=pid,
            name=_str(w, t, "name", pid),
            monthly_tokens=_int(w, t, "monthly_tokens"),
            price_inr_paise=_int(w, t, "price_inr_paise"),
            daily_requests=_int(w, t, "daily_requests", default=0),
            requests_per_minute=_int(w, t, "requests_per_minute", default=0),
            max_tokens_per_request=_int(w, t, "max_tokens_per_request", low=1, default=8192),
            rollover_pct=_int(w, t, "rollover_pct", default=50),
        )
        if plans[pid].rollover_pct > 100:
            raise CatalogError(f"{w}.rollover_pct: must be between 0 and 100")
    packs = {}
    for pid, t in _section(data, "packs").items():
        w = f"packs.{pid}"
        popular = t.get("popular", False)
        if not isinstance(popular, bool):
            raise CatalogError(f"{w}.popular: must be true or false")
        packs[pid] = Pack(pid, _str(w, t, "name", pid), _int(w, t, "tokens", low=1),
                          _int(w, t, "price_inr_paise"), popular)
    promos = {
        code: PromoCode(code, _int(f"promo_codes.{code}", t, "bonus_tokens", low=1))
        for code, t in _section(data, "promo_codes").items()
    }
    models = {}
    for mid, t in _section(data, "models").items():
        w = f"models.{mid}"
        if not LABEL_RE.fullmatch(mid):
            raise CatalogError(f"[{w}]: a model id is 1-64 of A-Z a-z 0-9 . _ : / @ + -")
        cached = _int(w, t, "cached_input_usd_micros_per_mtok") if "cached_input_usd_micros_per_mtok" in t else None
        models[mid] = Model(mid, _str(w, t, "name", mid), _int(w, t, "input_usd_micros_per_mtok"),
                            _int(w, t, "output_usd_micros_per_mtok"), cached)
    agents = {}
    for aid, t in _section(data, "agents").items():
        w = f"agents.{aid}"
        model = _str(w, t, "model")
        if model not in models:
            raise CatalogError(f"{w}.model: unknown model {model!r}")
        agents[aid] = Agent(aid, _str(w, t, "name", aid), _int(w, t, "estimate_tokens", low=1), model)
    rate = _int("catalog", data, "inr_paise_per_usd", low=1)
    project = _int("catalog", data, "project_estimate_tokens", default=0)
    project = project or sum(a.estimate_tokens for a in agents.values())
    strict = data.get("strict_labels", False)
    if not isinstance(strict, bool):
        raise CatalogError("catalog.strict_labels: must be true or false")
    return Catalog(plans, packs, promos, agents, models, rate, project, strict)


def load_catalog(path: str | Path | None = None) -> Catalog:
    """Load a catalog TOML file; None loads the built-in default (the product brief's numbers)."""
    try:
        if path is None:
            text = resources.files("meter").joinpath("catalog.toml").read_text("utf-8")
        else:
            text = Path(path).read_text("utf-8")
        data = tomllib.loads(text)
    except OSError as exc:
        raise CatalogError(f"cannot read catalog {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"catalog {path or 'default'} is not valid TOML: {exc}") from exc
    return parse_catalog(data)


_default: Catalog | None = None


def default_catalog() -> Catalog:
    global _default
    if _default is None:
        _default = load_catalog()
    return _default
