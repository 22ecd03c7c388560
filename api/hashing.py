"""Password hashing off the event loop: scrypt takes ~50 ms of CPU, which on the loop would stall
every other request (the meter's included) for that long. It runs in a small thread pool of its
own instead (hashlib.scrypt releases the GIL), so at most `threads` hashes run at once and the
loop keeps answering while they do."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from api import security

__all__ = ["PasswordHasher"]


def _lower_priority() -> None:
    """On Linux a thread has its own nice value: the hashing threads yield the CPU to the event
    loop's thread, so on a small machine a login storm slows logins, not the meter."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


class PasswordHasher:
    """`await hash(pw)` / `await verify(pw, stored)` on a bounded pool of `threads` threads."""

    def __init__(self, threads: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tokenmeter-hash",
                                        initializer=_lower_priority)
        # made at start (before any request): the first unknown email must not cost two hashes
        self._dummy = security.hash_password("tokenmeter: no such account")

    async def hash(self, password: str) -> str:
        # module attribute looked up per call: tests patch api.security's functions
        return await asyncio.get_running_loop().run_in_executor(self._pool, security.hash_password, password)

    async def verify(self, password: str, stored: str | None) -> bool:
        """True if `password` matches `stored`. With no stored hash (unknown email), a dummy hash
        of the same cost is checked, so an unknown email costs what a wrong password costs."""
        if stored is None:
            await asyncio.get_running_loop().run_in_executor(
                self._pool, security.verify_password, password, self._dummy)
            return False
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, security.verify_password, password, stored)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
