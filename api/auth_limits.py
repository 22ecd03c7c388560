"""Limits on the auth endpoints, counted in Redis (shared by every worker) under the deployment's
key prefix: registrations per client address and overall per window, and failed logins per
account and per address, with a lockout that doubles each time it is hit again."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from fastapi import HTTPException
from redis.asyncio import Redis
from redis.exceptions import RedisError

from api.client_address import limit_subject
from api.errors import error_body
from api.settings import Settings
from meter import StoreUnavailable
from meter import keys as keyspace

__all__ = ["AuthLimits", "LoginAttempt", "login_subjects"]

F = TypeVar("F", bound=Callable[..., Any])
_STRIKES_TTL_S = 86_400  # lockouts within a day of each other grow; after a quiet day they start over


def _fail_closed(method: F) -> F:
    """Redis unreachable: 503 (StoreUnavailable), as the meter does; never a 500, never unlimited."""
    @functools.wraps(method)
    async def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return await method(*args, **kwargs)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"auth limits: {exc}") from exc

    return cast(F, guarded)


def _too_many(error: str, message: str, retry_after_s: int) -> HTTPException:
    retry_after_s = max(int(retry_after_s), 1)
    return HTTPException(429, headers={"Retry-After": str(retry_after_s)}, detail=error_body(
        error, f"{message}; try again in {retry_after_s} s", retry_after_s=retry_after_s))


@dataclass(frozen=True, slots=True)
class LoginAttempt:
    """A login let through the throttle, already counted as a failure until it succeeds."""

    account: keyspace.LoginKeys
    address: keyspace.LoginKeys
    counts: tuple[int, int]  # failures in the window, this attempt included: (account, address)


def login_subjects(email: str, address: str, prefix: str) -> tuple[keyspace.LoginKeys, keyspace.LoginKeys]:
    """The failed-login keys of an (already normalized) email and of a client address."""
    digest = hashlib.sha256(email.encode()).hexdigest()[:32]  # no email addresses in key names
    return (keyspace.login_keys(f"acct:{digest}", prefix),
            keyspace.login_keys(f"addr:{limit_subject(address)}", prefix))


class AuthLimits:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis, self.s = redis, settings

    async def _count(self, key: str, window_s: int) -> tuple[int, int]:
        """INCR with the window set on the first hit; (count, seconds left in the window)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, window_s, nx=True)
            pipe.ttl(key)
            count, _, ttl = await pipe.execute()
        return int(count), int(ttl)

    @_fail_closed
    async def check_registration(self, address: str) -> None:
        """Count a registration attempt; 429 past the per-address or the global limit. The
        address is checked first, so one address over its limit does not use up the global one."""
        s, prefix = self.s, self.s.key_prefix
        count, ttl = await self._count(keyspace.registration_address_key(limit_subject(address), prefix),
                                       s.register_window_s)
        if count > s.register_per_address:
            raise _too_many("too_many_registrations", "too many registrations from this address", ttl)
        count, ttl = await self._count(keyspace.registration_global_key(prefix), s.register_window_s)
        if count > s.register_global:
            raise _too_many("too_many_registrations", "registrations are paused for a while", ttl)

    @_fail_closed
    async def begin_login(self, email: str, address: str) -> LoginAttempt:
        """429 while the account or the address is locked out; otherwise the attempt is counted
        (before the password is checked, so a burst of parallel guesses cannot outrun the count)."""
        account, by_address = login_subjects(email, address, self.s.key_prefix)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.pttl(account.lockout)
            pipe.pttl(by_address.lockout)
            locked_ms = max(int(x) for x in await pipe.execute())
        if locked_ms > 0:
            raise _too_many("too_many_attempts", "too many failed logins", -(-locked_ms // 1000))
        counts = []
        for keys in (account, by_address):
            count, _ = await self._count(keys.failures, self.s.login_failure_window_s)
            counts.append(count)
        if max(counts) > self.s.login_max_failures:  # parallel attempts beyond the limit
            raise _too_many("too_many_attempts", "too many failed logins", self.s.login_lockout_s)
        return LoginAttempt(account, by_address, (counts[0], counts[1]))

    @_fail_closed
    async def login_failed(self, attempt: LoginAttempt) -> None:
        """The attempt that reaches the limit locks its subject out: the first lockout lasts
        `login_lockout_s`, each further one within a day twice as long, up to the maximum."""
        s = self.s
        for keys, count in zip((attempt.account, attempt.address), attempt.counts, strict=True):
            if count != s.login_max_failures:
                continue
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.incr(keys.strikes)
                pipe.expire(keys.strikes, _STRIKES_TTL_S)
                strikes, _ = await pipe.execute()
            lockout = min(s.login_lockout_s * 2 ** min(int(strikes) - 1, 30), s.login_lockout_max_s)
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(keys.lockout, "1", ex=lockout)
                pipe.delete(keys.failures)  # after the lockout: another full set of attempts, then a longer one
                await pipe.execute()

    @_fail_closed
    async def login_succeeded(self, attempt: LoginAttempt) -> None:
        """The account's count starts over; the address only gets this attempt back (a shared
        address must not be cleared by whoever logs in to their own account from it)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(attempt.account.failures, attempt.account.strikes)
            await pipe.execute()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.decr(attempt.address.failures)
            pipe.expire(attempt.address.failures, self.s.login_failure_window_s, nx=True)
            await pipe.execute()
