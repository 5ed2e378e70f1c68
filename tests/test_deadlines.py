"""Job time limits: one watchdog thread fires each deadline once, unless the job ended first.

The deadlines run on a clock the test moves (the watchdog still sleeps in real time, as long as that
clock says), so what is checked is which deadline fires when the clock passes it, not how fast a loaded
machine gets round to it."""

from __future__ import annotations

import threading

from tests.support.jobs import wait_until
from zimage_serve.worker.deadlines import Deadlines


class Clock:
    """Seconds that pass only when the test says; counts the watchdog's looks at it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.looks = 0

    def __call__(self) -> float:
        if threading.current_thread() is not threading.main_thread():
            self.looks += 1
        return self.now


def test_deadlines_fire_once_in_order_and_not_after_removal() -> None:
    clock = Clock()
    fired: list[tuple[str, float]] = []
    deadlines = Deadlines(lambda key: fired.append((key, clock.now)), clock)
    deadlines.add("late", 1000.0)
    # The watchdog has looked, so it sleeps until "late": a real 1000 s, unless a nearer deadline wakes it.
    wait_until(lambda: clock.looks >= 1)
    deadlines.add("removed", 0.01)
    deadlines.add("early", 0.02)
    deadlines.remove("removed")
    clock.now = 0.03
    wait_until(lambda: fired, timeout=60)  # woken for the nearer deadline, well before 1000 s
    assert fired == [("early", 0.03)]  # "removed" was gone when the clock passed it; "late" is not due

    clock.now = 999.97  # (moved before a deadline is added: the watchdog sleeps as long as this clock says)
    deadlines.add("sentinel", 0.01)
    clock.now = 999.99
    wait_until(lambda: len(fired) == 2, timeout=60)
    assert fired[1] == ("sentinel", 999.99)  # "late" (at 1000) still not fired: not due at any time it saw

    clock.now = 1000.0
    wait_until(lambda: len(fired) == 3, timeout=60)
    deadlines.add("last", 0.01)
    clock.now = 1000.01
    wait_until(lambda: len(fired) == 4, timeout=60)
    # Each fired once, in the order of their deadlines, once the clock had passed each.
    assert fired == [("early", 0.03), ("sentinel", 999.99), ("late", 1000.0), ("last", 1000.01)]


def test_many_jobs_cost_no_thread_each() -> None:
    deadlines = Deadlines(lambda key: None)
    before = threading.active_count()
    for index in range(500):
        deadlines.add(str(index), 60.0)
        deadlines.remove(str(index))
    assert threading.active_count() <= before + 1
