"""A worker of a cluster: claims jobs from the Redis queue, runs them on its device, and tells every API
node what happens (worker/bus.py's channels).

`zimage worker` runs one on any host that mounts the shared data dir; `zimage serve --queue redis://...
--workers N` starts N of them as child processes of the API node. Either way it is the same `Worker` as
on one machine, with leases and heartbeats, so one killed mid-job has its job taken by another once its
lease runs out, and a re-run replaces what the first run wrote (workflow/output_journal.py, whose journal
lies in the shared data dir).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Protocol

from zimage_serve.queue.jobs import QueueUnavailable
from zimage_serve.queue.redis_queue import DEFAULT_PREFIX, RedisQueue
from zimage_serve.redact import redacted
from zimage_serve.worker.build import WorkerConfig, build_executor, build_worker
from zimage_serve.worker.bus import ClusterBus
from zimage_serve.worker.messages import Cluster, Free, Interrupt, JobEvent, QueueChanged, Wake

if TYPE_CHECKING:
    from zimage_serve.worker.loop import Worker

log = logging.getLogger(__name__)


class Stopping(Protocol):
    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


class BusListener:
    """The worker's events, published for every API node. At most once, as pub/sub is: an event that
    cannot be sent while Redis is away is dropped (the job's record in the queue is what counts).

    The job's thread only queues them; one thread sends all that wait in one round trip (a pipeline),
    in order, so a job's half-dozen events cost it no network waits."""

    def __init__(self, bus: ClusterBus) -> None:
        self.bus = bus
        self._outbox: queue.SimpleQueue[Cluster] = queue.SimpleQueue()
        threading.Thread(target=self._pump, name="zimage-worker-events", daemon=True).start()

    def job_event(
        self, prompt_id: str, client_id: str | None, event: str, data: dict[str, Any], owner: str = ""
    ) -> None:
        self._send(JobEvent(prompt_id, client_id, event, data, owner))

    def queue_changed(self) -> None:
        self._send(QueueChanged())

    def listening(self) -> bool:
        return True  # API nodes on other machines may watch: they keep what they want of the events

    def _send(self, message: Cluster) -> None:
        self._outbox.put(message)

    def _pump(self) -> None:
        while True:
            batch = [self._outbox.get()]
            while len(batch) < 256:
                try:
                    batch.append(self._outbox.get_nowait())
                except queue.Empty:
                    break
            with contextlib.suppress(QueueUnavailable):
                self.bus.publish_all(self.bus.events, batch)


def run(config: WorkerConfig, stopping: Stopping) -> int:
    """Run a worker until `stopping` is set, then let its jobs finish within the grace; 0 if they did."""
    store = RedisQueue(config.queue, prefix=config.prefix or DEFAULT_PREFIX)
    bus = ClusterBus(store)
    executor = build_executor(config)
    worker: Worker | None = None
    started = time.time()

    def beat() -> None:
        assert worker is not None
        running = [{"prompt_id": e.prompt_id, "node": e.node} for e in worker.executing()]
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "state": worker.state(),
            "device": executor.device_stats(),
            "concurrency": worker.concurrency,
            "running": running,
            "started": started,
        }
        bus.beat(worker.id, info)

    worker = build_worker(config, store, BusListener(bus), executor, on_ready=lambda: _quietly(beat), on_beat=beat)

    def heard(message: Cluster) -> None:
        assert worker is not None
        match message:
            case Wake():
                worker.notify()
            case Interrupt(prompt_id):
                worker.interrupt(prompt_id)
            case Free(caches):
                executor.free(caches)

    if config.metrics_port is not None:
        from zimage_serve.metrics import node_registry, serve_on

        serve_on(config.metrics_port, node_registry())
    listening = threading.Event()
    listener = bus.listen(bus.control, heard, listening)
    worker.start()
    log.warning("worker %s takes jobs from %s (device %s)", worker.id, redacted(store.url), executor.placement.device)
    stopping.wait()
    clean = worker.stop(config.run.shutdown_grace_s)
    listening.set()
    listener.join(5)  # before the connections close under it
    _quietly(lambda: bus.leave(worker.id))
    store.close()
    return 0 if clean else 3


def _quietly(call: Any) -> None:
    with contextlib.suppress(QueueUnavailable):
        call()


def child_main(config: WorkerConfig, stopping: Stopping, parent_pid: int) -> None:
    """A worker started by an API node (`--workers N`): it dies with the node, and stops when told."""
    from zimage_serve.worker.process import child_setup

    child_setup(parent_pid, config.log_level)
    os._exit(run(config, stopping))
