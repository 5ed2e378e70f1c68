"""Plain runs share a model's weights; a run that patches them has them alone, and is not starved."""

from __future__ import annotations

import threading
import time

import torch

from zimage_serve.engine.weight_lock import SharedExclusiveLock, lock_for


def writer_waiting(lock: SharedExclusiveLock) -> None:
    """Until a writer waits on `lock` (its waiting count is the lock's own state: no sleeping, no guessing)."""
    deadline = time.monotonic() + 5
    while lock._writers_waiting == 0:
        assert time.monotonic() < deadline, "no writer came to wait"
        time.sleep(0.001)


def test_readers_share_and_a_writer_waits_for_them() -> None:
    lock = SharedExclusiveLock()
    both_inside = threading.Barrier(3, timeout=5)
    leave = threading.Event()
    order: list[str] = []

    def reader(name: str) -> None:
        with lock.shared():
            both_inside.wait()  # would time out if readers excluded each other
            leave.wait(5)
            order.append(name)

    def writer() -> None:
        with lock.exclusive():
            order.append("writer")

    readers = [threading.Thread(target=reader, args=(f"r{i}",)) for i in range(2)]
    for thread in readers:
        thread.start()
    both_inside.wait()
    writing = threading.Thread(target=writer)
    writing.start()
    writer_waiting(lock)
    assert order == []  # the writer waits while readers are inside
    leave.set()
    for thread in [*readers, writing]:
        thread.join(5)
    assert order[-1] == "writer" and sorted(order[:2]) == ["r0", "r1"]


def test_a_waiting_writer_goes_before_readers_that_came_after_it() -> None:
    lock = SharedExclusiveLock()
    order: list[str] = []
    first_in, leave = threading.Event(), threading.Event()

    def first_reader() -> None:
        with lock.shared():
            first_in.set()
            leave.wait(5)
            order.append("first reader")

    def writer() -> None:
        with lock.exclusive():
            order.append("writer")

    def late_reader() -> None:
        with lock.shared():
            order.append("late reader")

    threads = [threading.Thread(target=first_reader)]
    threads[0].start()
    first_in.wait(5)
    threads.append(threading.Thread(target=writer))
    threads[1].start()
    writer_waiting(lock)
    threads.append(threading.Thread(target=late_reader))
    threads[2].start()
    leave.set()
    for thread in threads:
        thread.join(5)
    assert order == ["first reader", "writer", "late reader"]


def test_writers_exclude_each_other() -> None:
    lock = SharedExclusiveLock()
    inside = 0
    most = 0
    guard = threading.Lock()

    def writer() -> None:
        nonlocal inside, most
        with lock.exclusive():
            with guard:
                inside += 1
                most = max(most, inside)
            time.sleep(0.02)
            with guard:
                inside -= 1

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert most == 1


def test_one_lock_per_module() -> None:
    first, second = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    assert lock_for(first) is lock_for(first)
    assert lock_for(first) is not lock_for(second)
