"""Secrets out of what is printed or logged: connection URLs with their passwords masked."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit

__all__ = ["MASK", "mask_url"]

MASK = "***"
_SECRET_PARAMS = frozenset({"password", "pass", "passwd", "pwd", "secret", "token", "sslpassword"})


def mask_url(url: str) -> str:
    """`scheme://user:***@host/db?password=***`: the password of the authority and any secret
    query parameter replaced; everything else as given. Something that is not a URL is returned
    as is when it has no `@`, else masked whole (it may be a DSN with a password in it)."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a malformed authority
    except ValueError:
        return MASK if "@" in url else url
    masked = url
    if "@" in parts.netloc:
        userinfo, _, hostport = parts.netloc.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        if colon:
            masked = masked.replace(parts.netloc, f"{user}:{MASK}@{hostport}", 1)
        elif _is_token_only(parts.scheme):
            masked = masked.replace(parts.netloc, f"{MASK}@{hostport}", 1)
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        if any(k.lower() in _SECRET_PARAMS for k, _ in pairs):
            query = urlencode([(k, MASK if k.lower() in _SECRET_PARAMS else v) for k, v in pairs], safe="*")
            head, _, _ = masked.partition("?")
            masked = f"{head}?{query}" + (f"#{parts.fragment}" if parts.fragment else "")
    return masked


def _is_token_only(scheme: str) -> bool:
    """redis://secret@host: a lone userinfo is the password (AUTH <password>) in redis URLs."""
    return scheme.lower().startswith(("redis", "rediss", "unix"))
