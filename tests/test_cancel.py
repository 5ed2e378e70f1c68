"""Interrupts act inside one model call (every block of a loaded model checks first), and a prompt
cancelled a moment after a worker claimed it is stopped as it begins."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from tests.support.jobs import wait_until
from tests.support.listeners import Quiet
from tests.support.queues import enqueue
from zimage_serve.engine.cancel import cancellable, install
from zimage_serve.engine.placement import Placement
from zimage_serve.errors import GenerationCancelled
from zimage_serve.nano.default import default_model
from zimage_serve.queue.jobs import LEASE_S, Job
from zimage_serve.queue.sqlite_queue import SQLiteQueue
from zimage_serve.worker.loop import Worker
from zimage_serve.workflow.execute import Executor
from zimage_serve.workflow.folders import Folders, builtin_models
from zimage_serve.workflow.nodes import NODES
from zimage_serve.workflow.nodes.loading import load_model_file


class Blocks(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_call_stops_at_the_next_block_and_only_on_its_own_thread() -> None:
    model = install(Blocks())
    ran: list[int] = []
    for index, layer in enumerate(model.layers):
        layer.register_forward_hook(lambda *_, i=index: ran.append(i))
    with cancellable(lambda: len(ran) >= 2), pytest.raises(GenerationCancelled):
        model(torch.zeros(1, 4))
    assert ran == [0, 1]
    ran.clear()
    model(torch.zeros(1, 4))  # outside the block no check applies
    assert ran == list(range(6))
    assert install(model) is model  # installed once


def test_the_nano_transformer_stops_inside_its_call(tmp_path: object) -> None:
    from dataclasses import replace

    from zimage_serve.workflow.context import NodeContext

    assert default_model().is_dir()
    ctx = NodeContext(Folders(builtin=builtin_models()), Placement.choose("cpu"), "1")
    model = load_model_file(replace(ctx), "diffusion_models", "zimage-nano")
    blocks = [m for m in model.transformer.modules() if isinstance(m, torch.nn.ModuleList) for m in m]
    ran: list[int] = []
    handles = [block.register_forward_hook(lambda *_: ran.append(1)) for block in blocks]
    latent = torch.zeros(1, model.latent_channels, 16, 16)
    caption = torch.zeros(4, model.transformer.config.cap_feat_dim)
    with cancellable(lambda: len(ran) >= 3), pytest.raises(GenerationCancelled):
        model.velocity(latent, 0.5, [caption])
    assert len(ran) == 3 < len(blocks)
    for handle in handles:
        handle.remove()


class PausedClaims(SQLiteQueue):
    """A queue whose claims wait, once the job is marked running, until the test lets them go on: the moment
    between a worker's claim and its run's start, held open."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.claimed = threading.Event()
        self.go_on = threading.Event()

    def claim(self, worker: str = "", lease_s: float = LEASE_S) -> Job | None:
        job = super().claim(worker, lease_s)
        if job is not None:
            self.claimed.set()
            self.go_on.wait(60)
        return job


def test_a_cancel_between_a_jobs_claim_and_its_start_stops_it(tmp_path: Path) -> None:
    store = PausedClaims(tmp_path / "queue.sqlite3")
    executor = Executor(NODES, Folders.default(tmp_path / "data"), Placement.choose("cpu"))
    worker = Worker(store, executor, Quiet())
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "never"}},
    }
    enqueue(store, "late", 1, graph, {}, ["2"])
    worker.start()
    try:
        assert store.claimed.wait(60)
        assert store.get("late").state == "running"  # type: ignore[union-attr]
        assert not worker.interrupt("late")  # not begun: it is stopped as it begins
        assert not worker.interrupt("someone-elses")
        store.go_on.set()
        wait_until(lambda: store.get("late").state != "running")  # type: ignore[union-attr]
        assert store.get("late").state == "interrupted"  # type: ignore[union-attr]
        assert not list(executor.folders.output.glob("*.png"))
    finally:
        store.go_on.set()
        worker.stop(10)
