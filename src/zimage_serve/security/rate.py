"""Requests per minute per user: a sliding window over the last 60 seconds of state-changing requests.

Reads (GET: a gallery's thumbnails, the frontend's lists) are not counted: the limit is on the calls that
make work. The window lives in the server's memory; what must survive a restart (the images a user
made today) is counted in the queue file with the jobs.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque

WINDOW_S = 60.0


class RateLimiter:
    def __init__(self) -> None:
        self._calls: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def take(self, user: str, per_minute: int, now: float | None = None) -> int:
        """Count one request of `user`; 0 if it is within `per_minute`, else the seconds to wait."""
        now = time.monotonic() if now is None else now
        with self._lock:
            calls = self._calls.setdefault(user, deque())
            while calls and calls[0] <= now - WINDOW_S:
                calls.popleft()
            if len(calls) >= per_minute:
                return max(1, math.ceil(calls[0] + WINDOW_S - now))
            calls.append(now)
            return 0

    def recent(self, user: str, now: float | None = None) -> int:
        """The user's counted requests in the last minute."""
        now = time.monotonic() if now is None else now
        with self._lock:
            calls = self._calls.get(user)
            return sum(1 for t in calls if t > now - WINDOW_S) if calls else 0
