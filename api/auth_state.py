"""The auth machinery of a running app: the password hasher's thread pool, the auth limits, the
client-address resolver and the cache of accounts known to exist."""

from __future__ import annotations

import time
from dataclasses import dataclass

from api.auth_limits import AuthLimits
from api.client_address import ClientAddresses
from api.hashing import PasswordHasher
from api.runtime import Runtime

__all__ = ["AuthState", "KnownAccounts"]


class KnownAccounts:
    """Account ids seen in the database within the last `ttl` seconds: a user token is checked
    against the accounts table at most that often (a deleted account's tokens stop within it)."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._until: dict[str, float] = {}

    def __contains__(self, account_id: str) -> bool:
        until = self._until.get(account_id)
        return until is not None and until >= time.monotonic()

    def add(self, account_id: str) -> None:
        if len(self._until) > 10_000:
            self._until.clear()
        self._until[account_id] = time.monotonic() + self.ttl

    def discard(self, account_id: str) -> None:
        self._until.pop(account_id, None)


@dataclass
class AuthState:
    hasher: PasswordHasher
    limits: AuthLimits
    addresses: ClientAddresses
    accounts: KnownAccounts

    @classmethod
    def build(cls, rt: Runtime) -> AuthState:
        s = rt.settings
        return cls(hasher=PasswordHasher(s.hash_threads), limits=AuthLimits(rt.redis, s),
                   addresses=ClientAddresses(s.trusted_proxies), accounts=KnownAccounts(s.user_check_cache_s))

    def close(self) -> None:
        self.hasher.close()
