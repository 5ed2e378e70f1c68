"""Requests refused before anyone was identified, counted rather than written one by one.

A client without a token costs nothing to send a request, and every refusal used to be one audit record
with its whole path: 2,000 requests with long paths added 30 MB to the log in under a second. The audit
log is for what users did; what strangers tried is summarised, one record per address, reason and
minute, with how many there were and the first few paths, each cut short. The number of addresses kept
in one minute is bounded too: past it, the rest are counted together under the address "*".
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from zimage_serve.security.audit import iso

WINDOW_S = 60.0
ROUTE_CHARS = 200  # of each path kept: enough to see what was tried
ROUTES_KEPT = 5  # distinct method + path pairs kept per record
ADDRESSES_KEPT = 1000  # per minute; the others share one record


def cut(route: str, limit: int = ROUTE_CHARS) -> str:
    return route if len(route) <= limit else route[:limit] + "…"


@dataclass
class _Tally:
    count: int = 0
    routes: list[str] = field(default_factory=list)


class RefusalTally:
    """`note` each refusal; the summary of a minute is written when the next minute's first refusal
    comes, when `flush_due` finds the minute over (the server calls it every second), and at `flush`."""

    def __init__(self, write: Callable[[dict[str, Any]], None], clock: Callable[[], float] = time.time) -> None:
        self._write, self._clock = write, clock
        self._lock = threading.Lock()
        self._window: float | None = None
        self._tallies: dict[tuple[str, str, int], _Tally] = {}

    def note(self, address: str, reason: str, status: int, method: str, route: str) -> None:
        now = self._clock()
        with self._lock:
            ended = self._take_if_over(now)
            if self._window is None:
                self._window = now - now % WINDOW_S
            key = (address, reason, status)
            if key not in self._tallies and len(self._tallies) >= ADDRESSES_KEPT:
                key = ("*", reason, status)
            tally = self._tallies.setdefault(key, _Tally())
            tally.count += 1
            seen = f"{method} {cut(route)}"
            if len(tally.routes) < ROUTES_KEPT and seen not in tally.routes:
                tally.routes.append(seen)
        self._write_all(ended)

    def flush_due(self) -> None:
        with self._lock:
            ended = self._take_if_over(self._clock())
        self._write_all(ended)

    def flush(self) -> None:
        with self._lock:
            ended = self._take()
        self._write_all(ended)

    def _take_if_over(self, now: float) -> list[dict[str, Any]]:
        if self._window is not None and now >= self._window + WINDOW_S:
            return self._take()
        return []

    def _take(self) -> list[dict[str, Any]]:
        if self._window is None:
            return []
        start, tallies = self._window, self._tallies
        self._window, self._tallies = None, {}
        return [
            {
                "time": iso(start),
                "kind": "refusals",
                "address": address,
                "reason": reason,
                "status": status,
                "count": tally.count,
                "routes": tally.routes,
                "window_s": WINDOW_S,
            }
            for (address, reason, status), tally in tallies.items()
        ]

    def _write_all(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self._write(record)
