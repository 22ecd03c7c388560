"""tokenmeter's wallet: atomic token debits, holds and credits in Redis, for AI platforms.

    meter = await Meter.connect("redis://127.0.0.1:6379/0")
    await meter.open_account("user-42", plan="free")
    decision = await meter.debit("user-42", 2_000, agent="idea", model="haiku", request_id="r-1")
    if not decision.allowed: ...
"""

from meter._catalog import Agent, Catalog, Model, Pack, Plan, PromoCode, default_catalog, load_catalog
from meter._clock import Clock, FakeClock, SystemClock
from meter._errors import (
    CatalogError,
    IdempotencyConflict,
    InvalidInput,
    LedgerUnavailable,
    MeterError,
    OutcomeUnknown,
    StoreUnavailable,
    UnknownAccount,
    UnknownHold,
)
from meter._meter import CREDIT_KINDS, Loader, Meter, Store
from meter._reference import ReferenceStore
from meter._types import Balance, Decision, JournalEntry, Receipt

__all__ = [
    "CREDIT_KINDS",
    "Agent",
    "Balance",
    "Catalog",
    "CatalogError",
    "Clock",
    "Decision",
    "FakeClock",
    "IdempotencyConflict",
    "InvalidInput",
    "JournalEntry",
    "LedgerUnavailable",
    "Loader",
    "Meter",
    "MeterError",
    "Model",
    "OutcomeUnknown",
    "Pack",
    "Plan",
    "PromoCode",
    "Receipt",
    "ReferenceStore",
    "Store",
    "StoreUnavailable",
    "SystemClock",
    "UnknownAccount",
    "UnknownHold",
    "default_catalog",
    "load_catalog",
]
