"""What makes an email address one account, and a password acceptable at registration."""

from __future__ import annotations

import functools
import unicodedata
from pathlib import Path

__all__ = ["MIN_PASSWORD_LENGTH", "is_common_password", "normalize_email", "password_problem"]

MIN_PASSWORD_LENGTH = 10
_COMMON_PASSWORDS = Path(__file__).with_name("common_passwords.txt")


def normalize_email(email: str) -> str:
    """One spelling per address: Unicode NFKC (fullwidth letters, ligatures), case folded, the
    domain's trailing dot dropped, surrounding space trimmed. Stored so; login compares the same."""
    text = unicodedata.normalize("NFKC", email).strip()
    text = unicodedata.normalize("NFKC", text.casefold())  # folding can leave non-NFKC sequences
    local, at, domain = text.rpartition("@")
    if not at:
        return text
    return f"{local}@{domain.rstrip('.')}"


@functools.cache
def _common() -> frozenset[str]:
    lines = _COMMON_PASSWORDS.read_text(encoding="utf-8").splitlines()
    return frozenset(line.strip() for line in lines if line.strip() and not line.startswith("#"))


def is_common_password(password: str) -> bool:
    return password.casefold() in _common()


def password_problem(password: str, email: str = "") -> str | None:
    """Why `password` is refused at registration, or None when it is acceptable."""
    if len(password) < MIN_PASSWORD_LENGTH:
        return f"at least {MIN_PASSWORD_LENGTH} characters"
    if is_common_password(password):
        return "this password is among the most common ones; choose another"
    folded = password.casefold()
    if email and folded in (email, email.partition("@")[0]):
        return "the password must not be the email address"
    return None
