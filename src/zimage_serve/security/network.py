"""Who may reach the server, from where: the client's address (through trusted proxies only), the IP
allow-list, and the checks that keep web pages of other sites out (Origin, and Host on loopback).

A page on another site can make a browser send requests to a server on localhost: a form or fetch()
POST needs no CORS answer to be delivered. ComfyUI's answer, kept here, is to refuse a request whose
`Origin` names another host than its `Host`; we also refuse `Sec-Fetch-Site: cross-site`, and apply
both whether or not authentication is on. On loopback a DNS-rebinding page reaches the server under
its own host name, with a matching Origin: there the Host must be a loopback name.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from zimage_serve.errors import ZImageError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


class NetworkSettingError(ZImageError):
    """A bad --allow-ip, --trusted-proxy or --allow-origin value; the message names it."""


def networks(values: Iterable[str], option: str) -> tuple[Network, ...]:
    found = []
    for value in values:
        try:
            found.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError as exc:
            raise NetworkSettingError(f"{option}: {value!r} is not an IP address or CIDR network ({exc})") from exc
    return tuple(found)


def origins(values: Iterable[str]) -> frozenset[str]:
    found = set()
    for value in values:
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
            raise NetworkSettingError(f"--allow-origin: {value!r} is not an origin like https://host[:port]")
        found.add(f"{parts.scheme}://{parts.netloc.lower()}")
    return frozenset(found)


@functools.lru_cache(maxsize=256)  # every request's Host and peer are parsed: the same few, over and over
def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address


def is_loopback_bind(listen: str) -> bool:
    address = _address(listen)
    return listen.lower() in LOOPBACK_NAMES if address is None else address.is_loopback


DEFAULT_PORTS = {"http": "80", "https": "443"}


def split_host(host: str) -> tuple[str, str | None]:
    """A Host (or an origin's netloc) as (name, port): IPv6 brackets removed, the name lower-cased."""
    host = host.strip().lower()
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        return name, rest[1:] if rest.startswith(":") and rest[1:] else None
    name, colon, port = host.rpartition(":")
    if not colon or not port.isdigit():
        return host, None
    return name, port


@dataclass(frozen=True)
class NetworkPolicy:
    allow: tuple[Network, ...] = ()  # empty: every address may connect
    trusted_proxies: tuple[Network, ...] = ()
    allowed_origins: frozenset[str] = field(default_factory=frozenset)
    loopback_only: bool = True  # bound to loopback: the Host must be a loopback name (DNS rebinding)

    @classmethod
    def build(
        cls,
        allow_ip: Sequence[str] = (),
        trusted_proxy: Sequence[str] = (),
        allow_origin: Sequence[str] = (),
        listen: str = "127.0.0.1",
    ) -> NetworkPolicy:
        return cls(
            networks(allow_ip, "--allow-ip"),
            networks(trusted_proxy, "--trusted-proxy"),
            origins(allow_origin),
            is_loopback_bind(listen),
        )

    def client(self, peer: str, forwarded_for: str | None) -> str:
        """The client's address: the peer's, or, when the peer is a trusted proxy, the last address in
        X-Forwarded-For that is not one (proxies append, so earlier entries are the client's to forge)."""
        if not forwarded_for or not self.trusted_proxies or not self._in(peer, self.trusted_proxies):
            return peer
        hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
        for hop in reversed(hops):
            if _address(hop) is None:
                return peer  # a value no proxy of ours wrote: believe only the connection
            if not self._in(hop, self.trusted_proxies):
                return hop
        return hops[0] if hops else peer

    def trusted(self, address: str) -> bool:
        """Whether `address` is a trusted proxy's (whose connections carry everyone's requests)."""
        return bool(self.trusted_proxies) and self._in(address, self.trusted_proxies)

    def allowed(self, address: str) -> bool:
        return not self.allow or self._in(address, self.allow)

    @staticmethod
    def _in(address: str, nets: tuple[Network, ...]) -> bool:
        parsed = _address(address)
        return parsed is not None and any(parsed in net for net in nets)

    def cross_site(
        self, host: str | None, origin: str | None, fetch_site: str | None, navigation: bool = False
    ) -> str | None:
        """Why a browser request comes from a page of another site, or None when it does not. A plain
        navigation (a link followed to one of this server's pages, a GET) is not refused: it changes
        nothing, and a page it opens runs as this origin's."""
        if origin is not None and origin != "null":
            if origin.lower().rstrip("/") in self.allowed_origins:
                return None
            parts = urlsplit(origin)
            if not parts.netloc:
                return f"Origin {origin[:100]!r} is not a URL"
            if host is None:
                return "Origin without a Host"
            origin_name, origin_port = split_host(parts.netloc)
            origin_port = origin_port or DEFAULT_PORTS.get(parts.scheme.lower())  # http://host is port 80
            host_name, host_port = split_host(host)
            if origin_name != host_name or (host_port is not None and origin_port != host_port):
                return f"Origin {origin[:100]!r} is another site than this server ({host[:100]!r})"
            return None
        if origin == "null":
            return "Origin null (a sandboxed or local page)"
        if fetch_site == "cross-site" and not navigation:
            return "the browser says this request comes from another site (Sec-Fetch-Site)"
        return None

    def rebinding(self, host: str | None) -> str | None:
        """On loopback: why the Host is not this machine's (a DNS-rebinding page's), or None."""
        if not self.loopback_only or host is None:
            return None
        name, _ = split_host(host)
        address = _address(name)
        if name in LOOPBACK_NAMES or (address is not None and address.is_loopback):
            return None
        return f"Host {host[:100]!r} is not this machine's loopback name (DNS rebinding protection)"
