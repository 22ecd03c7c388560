"""The one exception tree of the meter. A denial is a `Decision`, never an exception."""

from __future__ import annotations

__all__ = [
    "CatalogError",
    "IdempotencyConflict",
    "InvalidInput",
    "MeterError",
    "StoreUnavailable",
    "UnknownAccount",
    "UnknownHold",
]


class MeterError(Exception):
    """Base class of every fault the meter raises."""


class InvalidInput(MeterError, ValueError):
    """A caller's argument is wrong; nothing was changed. `field` names the argument."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


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
    """Redis could not be reached or did not answer in time. The meter fails closed."""


class CatalogError(MeterError, ValueError):
    """The catalog file is malformed; the message names the offending entry."""
