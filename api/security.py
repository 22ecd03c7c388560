"""Passwords (scrypt), user tokens (JWT HS256) and service API keys (SHA-256, cached)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import jwt

__all__ = ["ApiKeyCache", "Principal", "hash_api_key", "hash_password", "issue_token", "new_api_key",
           "read_token", "verify_password"]

_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


def hash_password(password: str) -> str:
    """scrypt with a random 16-byte salt: 'scrypt$N$r$p$salt$hash' (base64)."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str | None) -> bool:
    try:
        _, n, r, p, salt, digest = (stored or "").split("$")
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             dklen=32)
    except ValueError:
        return False
    return hmac.compare_digest(got, base64.b64decode(digest))


def issue_token(secret: str, account_id: str, ttl_s: int) -> str:
    now = int(time.time())
    return jwt.encode({"sub": account_id, "iat": now, "exp": now + ttl_s}, secret, algorithm="HS256")


def read_token(secret: str, token: str) -> str | None:
    """The account id of a valid, unexpired token; None otherwise."""
    try:
        claims = jwt.decode(token, secret, algorithms=["HS256"], options={"require": ["sub", "exp"]})
    except jwt.PyJWTError:
        return None
    sub = claims.get("sub")
    return sub if isinstance(sub, str) else None


def new_api_key() -> tuple[str, str]:
    """(public id, full secret key). The key is 'tmk_<id>_<secret>'; only its SHA-256 is stored."""
    key_id = secrets.token_hex(6)
    return key_id, f"tmk_{key_id}_{secrets.token_urlsafe(32)}"


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a user (account_id) or a service key (scopes)."""

    kind: str  # "user" | "service"
    subject: str  # account id, or api key id ("master" for the master key)
    scopes: frozenset[str] = frozenset()


class ApiKeyCache:
    """Verified keys, by digest: fresh for `ttl` seconds (a revocation reaches every process
    within that time while the database is up), then kept as the last known verdict for
    `stale_ttl` seconds, served only while the database cannot be asked (`get_stale`)."""

    def __init__(self, ttl: float, stale_ttl: float = 0.0) -> None:
        self.ttl = ttl
        self.stale_ttl = stale_ttl
        # digest -> (fresh until, principal, verified at): monotonic seconds
        self._entries: dict[str, tuple[float, Principal | None, float]] = {}

    def get(self, digest: str) -> tuple[bool, Principal | None]:
        hit = self._entries.get(digest)
        if hit is None or hit[0] < time.monotonic():
            return False, None
        return True, hit[1]

    def get_stale(self, digest: str) -> tuple[bool, Principal | None]:
        """The last verdict of a key verified within `stale_ttl` seconds, fresh or not."""
        hit = self._entries.get(digest)
        if hit is None or hit[2] + self.stale_ttl < time.monotonic():
            return False, None
        return True, hit[1]

    def put(self, digest: str, principal: Principal | None) -> None:
        if len(self._entries) > 10_000:
            self._entries.clear()
        now = time.monotonic()
        self._entries[digest] = (now + self.ttl, principal, now)

    def hold(self, digest: str, seconds: float) -> None:
        """Serve a stale verdict as fresh for `seconds` (one database attempt per key per
        interval during an outage), without renewing its verification time."""
        hit = self._entries.get(digest)
        if hit is not None:
            self._entries[digest] = (time.monotonic() + seconds, hit[1], hit[2])

    def clear(self) -> None:
        self._entries.clear()
