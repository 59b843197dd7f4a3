"""Which hosts a stranger may send this node to: a relay's data URLs, a bucket's redirects. Only the public internet
(and the host the user or relay already named); never loopback, a private network, link-local or a local name,
which would let a stranger reach this node's own network through it."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

# host names that only mean something inside a network
LOCAL_NAME_SUFFIXES = (".localhost", ".local", ".internal", ".intranet", ".lan", ".home", ".corp", ".home.arpa")


def as_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host names literally, in any form a resolver takes (127.1, 0x7f000001 and 2130706433 are
    127.0.0.1 to getaddrinfo)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:
            ip = ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def normal_host(host: str) -> str:
    ip = as_ip(host)
    return str(ip) if ip is not None else host.lower().rstrip(".")


def host_of(url: str) -> str:
    return normal_host(urlsplit(url).hostname or "")


def is_public_host(host: str) -> bool:
    ip = as_ip(host)
    if ip is not None:
        return ip.is_global and not ip.is_multicast
    return "." in host and host != "localhost" and not host.endswith(LOCAL_NAME_SUFFIXES)


def redirect_allowed(url: str, target: str) -> bool:
    """A redirect stays on its URL's host or goes to a public one (object stores redirect to regional endpoints)."""
    return urlsplit(target).scheme in ("http", "https") and (
        host_of(target) == host_of(url) or is_public_host(host_of(target)))
