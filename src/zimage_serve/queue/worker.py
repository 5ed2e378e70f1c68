"""The worker: takes jobs from the store one at a time and runs them on the executor (one per device).

Every event goes to `Listener.job_event` with the job it belongs to, in ComfyUI's order; after a job the
history is written first, then `status`, then `executing` with node null, so a client that waits for
that last message always finds the history entry.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from zimage_serve.queue.store import Job, JobStore
from zimage_serve.workflow.execute import Executor, RunResult, execution_error

log = logging.getLogger(__name__)


class Listener(Protocol):
    def job_event(self, job: Job, event: str, data: dict[str, Any]) -> None: ...

    def queue_changed(self) -> None: ...


@dataclass
class Running:
    job: Job
    node: str | None = None
    started: float = field(default_factory=time.monotonic)


class Worker:
    def __init__(
        self,
        store: JobStore,
        executor: Executor,
        listener: Listener,
        job_timeout: float | None = None,
        on_idle: Callable[[], None] | None = None,
    ) -> None:
        self.store, self.executor, self.listener = store, executor, listener
        self.job_timeout = job_timeout
        self.running: Running | None = None
        self._wake = threading.Condition()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._timed_out = threading.Event()
        self._on_idle = on_idle

    # -- control -------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="zimage-worker", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """A job was queued: wake the worker if it sleeps."""
        with self._wake:
            self._wake.notify_all()

    def stop(self, timeout: float | None = None) -> bool:
        """Take no new job; let the running one finish within `timeout` (then interrupt it). True if idle."""
        self._stopping.set()
        self.notify()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the running job did not finish in %s s; interrupting it", timeout)
            self.executor.interrupt()
            self._thread.join(30)
        return not self._thread.is_alive()

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Interrupt the running job (only if it is `prompt_id`, when given). True if one was interrupted."""
        running = self.running
        if running is None or (prompt_id is not None and running.job.id != prompt_id):
            return False
        self.executor.interrupt()
        return True

    # -- the loop ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping.is_set():
            job = self.store.claim()
            if job is None:
                if self._on_idle is not None:
                    self._on_idle()
                with self._wake:
                    if not self._stopping.is_set():
                        self._wake.wait(timeout=1.0)
                continue
            try:
                self._run(job)
            except Exception:  # never let one job kill the worker; the job is recorded as failed
                log.exception("job %s failed outside the executor", job.id)
                self._record_failure(job, "internal error while running the prompt; see the server log")

    def _run(self, job: Job) -> None:
        self.running = Running(job)
        self.listener.queue_changed()
        self._timed_out.clear()
        timer = None
        if self.job_timeout is not None:
            timer = threading.Timer(self.job_timeout, self._time_out)
            timer.daemon = True
            timer.start()

        def emit(event: str, data: dict[str, Any]) -> None:
            if event == "executing" and self.running is not None:
                self.running.node = data.get("node")
            self.listener.job_event(job, event, data)

        try:
            result = self.executor.run(job.id, job.prompt, job.outputs, job.extra_data, emit)
        finally:
            if timer is not None:
                timer.cancel()
        if result.status == "interrupted" and self._timed_out.is_set():
            self._note_timeout(job, result)
        state = {"success": "success", "error": "error", "interrupted": "interrupted"}[result.status]
        meta = {n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n} for n in result.outputs}
        self.store.finish(job.id, state, {"outputs": result.outputs, "messages": result.messages, "meta": meta})
        self.running = None
        self.listener.queue_changed()
        self.listener.job_event(job, "executing", {"node": None, "prompt_id": job.id})

    def _time_out(self) -> None:
        self._timed_out.set()
        self.executor.interrupt()

    def _note_timeout(self, job: Job, result: RunResult) -> None:
        """A job stopped by the time limit is an error in history, with the limit named."""
        message = f"the prompt ran longer than the {self.job_timeout:g} s limit and was stopped"
        interrupted = next((d for e, d in result.messages if e == "execution_interrupted"), {})
        data = execution_error(
            job.id,
            message,
            "Timeout",
            node_id=interrupted.get("node_id"),
            node_type=interrupted.get("node_type"),
            executed=interrupted.get("executed"),
        )
        result.messages = [(e, d) for e, d in result.messages if e != "execution_interrupted"]
        result.messages.append(("execution_error", data))
        result.status = "error"

    def _record_failure(self, job: Job, message: str) -> None:
        data = execution_error(job.id, message, "InternalError")
        self.store.finish(job.id, "error", {"outputs": {}, "messages": [["execution_error", data]], "meta": {}})
        self.running = None
        self.listener.job_event(job, "execution_error", data)
        self.listener.queue_changed()
        self.listener.job_event(job, "executing", {"node": None, "prompt_id": job.id})
