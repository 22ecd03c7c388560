"""The client's address for per-address limits: the TCP peer (`request.client.host`), or, only
when that peer is a configured reverse proxy, the address the proxies report in X-Forwarded-For
(a header any client can write, so it is believed only from proxies we know)."""

from __future__ import annotations

import ipaddress

from starlette.requests import Request

__all__ = ["ClientAddresses", "limit_subject"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _hop_address(hop: str) -> str | None:
    """The address of one X-Forwarded-For hop: `a.b.c.d`, `a.b.c.d:port`, `[v6]`, `[v6]:port` or
    a bare IPv6 address (some proxies append the port); None when it is none of these."""
    if hop.startswith("["):
        end = hop.find("]")
        hop = hop[1:end] if end > 0 else hop
    elif hop.count(":") == 1:  # IPv4 with a port (a bare IPv6 address has several colons)
        hop = hop.split(":", 1)[0]
    try:
        return str(ipaddress.ip_address(hop))
    except ValueError:
        return None


def _networks(spec: str) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in spec.split(",") if part.strip())


class ClientAddresses:
    """Resolves a request's client address given the trusted proxies (comma-separated IPs/CIDRs)."""

    def __init__(self, trusted_proxies: str = "") -> None:
        self.trusted = _networks(trusted_proxies)

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)

    def of(self, request: Request) -> str:
        peer = request.client.host if request.client else "unknown"
        if not self.trusted or not self._is_trusted(peer):
            return peer
        # Right to left: each trusted proxy appended the address it saw; the first hop that is
        # not one of ours is the client. Anything unparsable stops the walk at the last good hop.
        client = peer
        for header in reversed(request.headers.getlist("x-forwarded-for")):
            for raw in reversed([h.strip() for h in header.split(",")]):
                hop = _hop_address(raw)
                if hop is None:
                    return client
                client = hop
                if not self._is_trusted(hop):
                    return client
        return client


def limit_subject(address: str) -> str:
    """What one client is, for limits: an IPv4 address, or an IPv6 /64 (one host usually owns a
    whole /64, so single IPv6 addresses would be free to rotate)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d is the IPv4 client
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)
