"""The cluster's workers as an API node sees them: the `DeviceWorker` of a node whose queue is Redis.

It hears every worker's events (and hands them to this node's sockets), sends interrupt and free to all
workers, reads who runs what from the queue and the register, and, with `--workers N`, runs N workers of
its own as child processes, started again when one dies.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from zimage_serve.queue.jobs import QueueUnavailable
from zimage_serve.queue.redis_queue import RedisQueue
from zimage_serve.worker.build import WorkerConfig
from zimage_serve.worker.bus import ClusterBus, WorkerRecord
from zimage_serve.worker.cluster import child_main
from zimage_serve.worker.loop import Listener
from zimage_serve.worker.messages import Cluster, Executing, Free, Interrupt, JobEvent, QueueChanged
from zimage_serve.worker.process import restart_delay, wait_for_child

log = logging.getLogger(__name__)
NO_DEVICE: dict[str, object] = {
    "name": "none",
    "type": "none",
    "index": 0,
    "vram_total": 0,
    "vram_free": 0,
    "torch_vram_total": 0,
    "torch_vram_free": 0,
}


class _LocalWorker:
    """One child process running a cluster worker, and its supervisor thread."""

    def __init__(self, config: WorkerConfig, index: int, owner: ClusterWorkers) -> None:
        self.config, self.index, self.owner = config, index, owner
        context = multiprocessing.get_context("spawn")  # no fork: threads and CUDA do not survive one
        self._context = context
        self.stopping = context.Event()
        self.process: multiprocessing.process.BaseProcess | None = None
        self._supervisor: threading.Thread | None = None

    def start(self) -> None:
        self._spawn()
        self._supervisor = threading.Thread(target=self._watch, name=f"zimage-local-worker-{self.index}", daemon=True)
        self._supervisor.start()

    def _spawn(self) -> None:
        process = self._context.Process(
            target=child_main, args=(self.config, self.stopping, os.getpid()), name=f"zimage-worker-{self.index}"
        )
        process.daemon = True
        process.start()
        self.process = process

    def _watch(self) -> None:
        quick_failures = 0
        while True:
            process = self.process
            assert process is not None
            began = time.monotonic()
            process.join()
            if self.stopping.is_set():
                return
            log.error("local worker %d died (exit code %s); starting it again", self.index, process.exitcode)
            self.owner.worker_died()
            quick_failures = quick_failures + 1 if time.monotonic() - began < 60 else 0
            if self.stopping.wait(restart_delay(quick_failures)):
                return
            self._spawn()

    def stop(self, timeout: float | None) -> bool:
        self.stopping.set()
        process = self.process
        return True if process is None else wait_for_child(process, timeout)


class ClusterWorkers:
    def __init__(
        self,
        store: RedisQueue,
        listener: Listener,
        local: list[WorkerConfig],
        audience: Callable[[], int] = lambda: 1,
    ) -> None:
        self.store, self.listener = store, listener
        # Events go only to sockets: with none connected to this node they are skipped undecoded (the node a
        # prompt is on is then unknown here until its next event).
        self.audience = audience
        self.bus = ClusterBus(store)
        self._local = [_LocalWorker(config, i, self) for i, config in enumerate(local)]
        self._nodes: dict[str, str | None] = {}  # the node each running prompt is on, from its events
        self._stopping = threading.Event()

    # -- control ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self.bus.listen(self.bus.events, self._heard, self._stopping, wanted=lambda: self.audience() > 0)
        for local in self._local:
            local.start()

    def stop(self, timeout: float | None = None) -> bool:
        self._stopping.set()
        results = [local.stop(timeout) for local in self._local]
        return all(results)

    def notify(self) -> None:
        """Nothing to do: the queue's own script publishes the wake-up as it stores a job."""

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Sent to every worker (the one running `prompt_id` stops it; None: every running prompt); True if
        the queue says it runs."""
        self.bus.publish(self.bus.control, Interrupt(prompt_id))
        if prompt_id is None:
            return self.store.count("running") > 0
        job = self.store.get(prompt_id)
        return job is not None and job.state == "running"

    def free(self, caches: bool = True) -> None:
        self.bus.publish(self.bus.control, Free(caches))

    def executing(self) -> list[Executing]:
        return [
            Executing(job.id, job.extra_data.get("client_id"), self._nodes.get(job.id), job.owner)
            for job in self.store.running()
        ]

    def workers(self) -> list[WorkerRecord]:
        """The register (empty while Redis is away: /system_stats still answers)."""
        return self._live()

    def ends_wanted(self, count: int) -> None:
        """The cluster's workers publish every job end on the bus as it happens: nothing to change."""

    def device_stats(self) -> dict[str, object]:
        """The first live worker's device (ComfyUI's /system_stats shows one per worker: see `workers`)."""
        for record in self._live():
            device = record.info.get("device")
            if isinstance(device, dict):
                return device
        return dict(NO_DEVICE)

    def state(self) -> str:
        """ "ready" while some worker of the cluster is (this node can have its prompts run), else
        "starting"; "stopped" once stopping."""
        if self._stopping.is_set():
            return "stopped"
        return "ready" if any(r.info.get("state") == "ready" for r in self._live()) else "starting"

    def worker_died(self) -> None:
        """A local worker died: its jobs are queued again at once (its process is gone, so they are the
        jobs of a gone worker), not after its lease."""
        try:
            recovered = self.store.recover(cause="a worker process died")
        except QueueUnavailable:
            return  # the other workers' heartbeats recover them once the queue is back
        if recovered:
            self.listener.queue_changed()

    # -- internals -------------------------------------------------------------------------------------
    def _live(self) -> list[WorkerRecord]:
        try:
            return self.bus.workers()
        except QueueUnavailable:
            return []

    def _heard(self, message: Cluster) -> None:
        match message:
            case JobEvent(prompt_id, client_id, event, data, owner):
                if event == "executing":
                    self._note_node(prompt_id, data)
                self.listener.job_event(prompt_id, client_id, event, data, owner)
            case QueueChanged():
                self.listener.queue_changed()

    def _note_node(self, prompt_id: str, data: dict[str, Any]) -> None:
        node = data.get("node")
        if node is None:
            self._nodes.pop(prompt_id, None)
        else:
            self._nodes[prompt_id] = str(node)
            if len(self._nodes) > 10000:  # prompts whose end was missed (a lost connection): forget the oldest
                self._nodes.pop(next(iter(self._nodes)))
