"""Which queue a `--queue` URL names (server/backend.py opens it, with what it brings).

No `--queue` (or `sqlite`): the SQLite file `<data dir>/queue.sqlite3`, one machine. `redis://HOST:PORT/DB`
(also `rediss://` with TLS, `unix:///path/to/socket`): Redis, shared by every API node and worker that
names it. `?prefix=NAME` keeps several clusters apart in one Redis (`zimage:` by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit, urlunsplit

from zimage_serve.config import ConfigError
from zimage_serve.redact import redacted

REDIS_SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True)
class QueueChoice:
    kind: str  # "sqlite" or "redis"
    url: str  # for Redis: the URL without our own `prefix` parameter
    prefix: str = ""

    @property
    def shown(self) -> str:
        """The URL as printed and logged: its password, if it has one, hidden."""
        return redacted(self.url)

    @property
    def shared(self) -> bool:
        """Whether other machines' nodes share this queue (a cluster)."""
        return self.kind == "redis"


def choose(url: str | None) -> QueueChoice:
    if url is None or url in ("", "sqlite"):
        return QueueChoice("sqlite", "")
    parts = urlsplit(url)
    if parts.scheme not in REDIS_SCHEMES:
        raise ConfigError(
            f"{redacted(url)!r} is not a queue this server can use: give redis://HOST:PORT/DB or sqlite", "--queue"
        )
    options = parse_qs(parts.query)
    prefix = options.pop("prefix", ["zimage:"])[0]
    if not prefix or len(prefix) > 64 or any(c.isspace() for c in prefix):
        raise ConfigError(f"prefix {prefix!r} must be 1 to 64 characters without spaces", "--queue")
    query = "&".join(f"{key}={value}" for key, values in options.items() for value in values)
    return QueueChoice("redis", urlunsplit(parts._replace(query=query)), prefix)
