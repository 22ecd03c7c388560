"""The one exception tree of the meter. A denial is a `Decision`, never an exception."""

from __future__ import annotations

__all__ = [
    "CatalogError",
    "IdempotencyConflict",
    "InvalidInput",
    "LedgerUnavailable",
    "MeterError",
    "OutcomeUnknown",
    "StoreUnavailable",
    "UnknownAccount",
    "UnknownHold",
]


class MeterError(Exception):
    """Base class of every fault the meter raises."""


class InvalidInput(MeterError, ValueError):
    """A caller's argument is wrong; nothing was changed. `field` names the argument."""

    def __init__(self, field: str, message: str, *, maximum: int | None = None) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.maximum = maximum  # the limit passed, when the value was over one (the plan's per-request maximum)


class UnknownAccount(MeterError, LookupError):
    """The account does not exist (and could not be rehydrated)."""

    def __init__(self, account_id: str) -> None:
        super().__init__(f"unknown account {account_id!r}")
        self.account_id = account_id


class UnknownHold(MeterError, LookupError):
    """The hold does not exist: never made, already settled or released, or expired."""

    def __init__(self, account_id: str, hold_id: str) -> None:
        super().__init__(f"unknown hold {hold_id!r} on account {account_id!r}")
        self.account_id = account_id
        self.hold_id = hold_id


class IdempotencyConflict(MeterError):
    """The request id was already used with different parameters; nothing was changed."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"request id {request_id!r} was already used with other parameters")
        self.request_id = request_id


class StoreUnavailable(MeterError):
    """Redis could not be reached: the command was not sent, so nothing was changed. The meter
    fails closed. (Its subclass OutcomeUnknown is the case where the command was sent.)"""


class OutcomeUnknown(StoreUnavailable):
    """The command was sent, then the connection dropped or Redis did not answer in time: it may
    well have run (it usually did). Retry with the same request id: the retry is replayed if the
    first one ran, charged once if it did not. A call without a request id is not retry-safe."""


class LedgerUnavailable(MeterError):
    """The account had to be read from the ledger (missing from Redis, or not yet checked against
    the ledger since Redis restarted) and the ledger could not be read: nothing was changed.
    Retry later; accounts already checked keep working while the database is down."""


class CatalogError(MeterError, ValueError):
    """The catalog file is malformed; the message names the offending entry."""
