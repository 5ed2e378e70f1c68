"""Who may use a model's weights at once: any number of plain runs, or one run that patches them.

LoRA deltas are added to the shared weights in place for one sampling run (no second copy of a 6B
model), so while that run lasts no other run may read those weights. Plain runs share them freely. A
waiting patcher blocks new readers, so a steady stream of plain runs cannot starve it.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator

import torch


class SharedExclusiveLock:
    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._condition:
            self._condition.wait_for(lambda: not self._writer and self._writers_waiting == 0)
            self._readers += 1
        try:
            yield
        finally:
            with self._condition:
                self._readers -= 1
                self._condition.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._condition:
            self._writers_waiting += 1
            try:
                self._condition.wait_for(lambda: not self._writer and self._readers == 0)
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._condition:
                self._writer = False
                self._condition.notify_all()


_locks: weakref.WeakKeyDictionary[torch.nn.Module, SharedExclusiveLock] = weakref.WeakKeyDictionary()
_registry_lock = threading.Lock()


def lock_for(module: torch.nn.Module) -> SharedExclusiveLock:
    """The one lock of this module's weights, created on first use and dropped with the module."""
    with _registry_lock:
        lock = _locks.get(module)
        if lock is None:
            lock = _locks[module] = SharedExclusiveLock()
        return lock
