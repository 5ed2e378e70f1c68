"""Job time limits: one watchdog thread fires each deadline once, unless the job ended first."""

from __future__ import annotations

import threading
import time

from zimage_serve.queue.deadlines import Deadlines


def test_deadlines_fire_once_in_order_and_not_after_removal() -> None:
    fired: list[tuple[str, float]] = []
    done = threading.Event()
    started = time.monotonic()

    def expired(key: str) -> None:
        fired.append((key, time.monotonic() - started))
        if key == "late":
            done.set()

    deadlines = Deadlines(expired)
    deadlines.add("late", 0.6)
    deadlines.add("removed", 0.1)
    deadlines.add("early", 0.2)  # nearer than the watchdog's next look: it is woken for it
    deadlines.remove("removed")
    assert done.wait(5)
    time.sleep(0.1)
    assert [key for key, _ in fired] == ["early", "late"]
    early, late = (at for _, at in fired)
    assert 0.15 <= early < 0.5 and 0.55 <= late < 2.0


def test_many_jobs_cost_no_thread_each() -> None:
    deadlines = Deadlines(lambda key: None)
    before = threading.active_count()
    for index in range(500):
        deadlines.add(str(index), 60.0)
        deadlines.remove(str(index))
    assert threading.active_count() <= before + 1
