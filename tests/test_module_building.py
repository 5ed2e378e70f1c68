"""Modules built in one thread are never made on the meta device by another thread's empty build."""

from __future__ import annotations

import threading

import torch

from zimage_serve.engine.construction import building


def test_a_module_built_while_another_thread_builds_an_empty_one_gets_real_weights() -> None:
    inside, release = threading.Event(), threading.Event()
    empty: list[torch.nn.Module] = []

    def build_empty() -> None:
        with building(empty=True):
            inside.set()
            release.wait(30)
            empty.append(torch.nn.Linear(2, 2))

    thread = threading.Thread(target=build_empty)
    thread.start()
    assert inside.wait(30)
    built: list[torch.nn.Module] = []
    other = threading.Thread(target=lambda: built.append(_real_linear()))
    other.start()
    other.join(0.2)
    assert other.is_alive()  # waits for the empty build to end instead of building into it
    release.set()
    thread.join(30)
    other.join(30)
    assert empty[0].weight.device.type == "meta"
    assert built[0].weight.device.type == "cpu"


def _real_linear() -> torch.nn.Module:
    with building():
        return torch.nn.Linear(2, 2)
