"""The worker: takes jobs from the store and runs them on the executor (one worker per device).

It runs at most `concurrency` jobs at once, each on its own thread: on a GPU a second job's text
encoding, decoding and saving overlap the first one's sampling (the field report advises at most 2).

Every event goes to `Listener.job_event` with the prompt and client it belongs to, in ComfyUI's
order; after a job the history is written first, then the run's closing event (`execution_success`,
`execution_error` or `execution_interrupted`, which the executor returns rather than emits), then
`status`, then `executing` with node null, so a client that reacts to any of ComfyUI's completion events
finds the history entry (ComfyUI itself sends `execution_success` before it writes the history).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from zimage_serve.identity import Identity
from zimage_serve.metrics import JobEnd, observe_job
from zimage_serve.queue.contract import JobQueue
from zimage_serve.queue.jobs import LEASE_S, Job, QueueUnavailable, worker_id
from zimage_serve.worker.deadlines import Deadlines
from zimage_serve.worker.image_tally import ImageTally
from zimage_serve.worker.messages import Executing
from zimage_serve.workflow.context import Stop
from zimage_serve.workflow.events import execution_error

if TYPE_CHECKING:
    import torch

    from zimage_serve.workflow.execute import Executor

log = logging.getLogger(__name__)
GPU_JOB_TIMEOUT_S = 30.0
# On a CPU (or MPS) a full-size Z-Image prompt can take many minutes; past half an hour it is stuck.
OTHER_JOB_TIMEOUT_S = 1800.0
PRELOAD_ID = "zimage-preload"  # the warm-up run's id (never a UUID, so never a client's)
# How long a stop asked for a prompt this worker has claimed, but not begun, waits for the prompt to begin.
ASKED_STOP_S = 60.0
IDLE_WAIT_S = 1.0  # how long an idle worker sleeps before it looks at the queue again, unless woken


def lease_clock() -> float:
    """Seconds on a clock that goes on while the machine sleeps (Linux's boot time), as leases do: a host
    woken from a suspend must not think a lease that ran out meanwhile still holds."""
    if hasattr(time, "CLOCK_BOOTTIME"):
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    return time.monotonic()


def warm_up_prompt() -> tuple[dict[str, Any], list[str]]:
    """The shipped nano workflow with one step, run up to its decoded image (nothing is saved)."""
    from zimage_serve import workflows

    prompt = workflows.load(workflows.NANO)
    decode = [node_id for node_id, node in prompt.items() if node["class_type"] == "VAEDecode"]
    for node in prompt.values():
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 1
    return prompt, decode


def job_timeout(configured: float | None, device: torch.device) -> float | None:
    """The field report's advice: a prompt on a GPU that runs past 30 s is stuck, not slow. Elsewhere
    the default is generous, but there is one: no prompt holds the worker for ever. 0: no limit."""
    if configured is None:
        return GPU_JOB_TIMEOUT_S if device.type == "cuda" else OTHER_JOB_TIMEOUT_S
    return configured if configured > 0 else None


class Listener(Protocol):
    def job_event(
        self, prompt_id: str, client_id: str | None, event: str, data: dict[str, Any], owner: str = ""
    ) -> None: ...

    def queue_changed(self) -> None: ...

    def listening(self) -> bool:
        """Whether anyone would see a job's events beyond its end (a socket, an event stream) just now."""
        ...


@dataclass
class Running:
    job: Job
    node: str | None = None
    started: float = field(default_factory=time.monotonic)
    stop: Stop = field(default_factory=Stop)  # the run's stop request, made before the run (Executor.run)
    # Until when (`lease_clock`) the lease surely holds: from before the claim or the last renewal that took
    # it, plus the lease. Leases end only by running out, so until then the job is this worker's without
    # asking the queue.
    leased_until: float = 0.0


class Worker:
    def __init__(
        self,
        store: JobQueue,
        executor: Executor,
        listener: Listener,
        job_timeout: float | None = None,
        on_idle: Callable[[], None] | None = None,
        concurrency: int = 1,
        preload: bool = False,
        on_ready: Callable[[], None] | None = None,
        lease_s: float = LEASE_S,
        on_beat: Callable[[], None] | None = None,
        on_end: Callable[[JobEnd], None] = observe_job,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        self.store, self.executor, self.listener = store, executor, listener
        self.job_timeout, self.concurrency = job_timeout, concurrency
        self._running: dict[str, Running] = {}
        # Stops asked for prompts this worker claimed and has not begun yet (id -> when asked): the claim and
        # the run's start are two steps, and a cancel that comes between must still stop the run.
        self._asked: dict[str, float] = {}
        # When each claim not yet begun was asked for (`lease_clock`): where its lease starts, at the latest.
        self._claimed_at: dict[str, float] = {}
        self._running_lock = threading.Lock()
        self._wake = threading.Condition()
        self._wakes = 0  # wake-ups so far (under `_wake`): one that came while a thread was not waiting counts
        self._stopping = threading.Event()
        self._cut_off = threading.Event()  # the shutdown's grace ran out: interrupted jobs go back to the queue
        self._threads: list[threading.Thread] = []
        self._deadlines = Deadlines(self._time_out)
        self._on_idle = on_idle
        self._preload, self._on_ready = preload, on_ready
        self.ready = threading.Event()  # set once the default model is loaded (at once without preload)
        # Its name in the queue (host, process, random), and how long its claims hold between heartbeats.
        self.id, self.lease_s = worker_id(), lease_s
        self._on_beat = on_beat  # told at start and at every heartbeat (a cluster's register of workers)
        self._on_end = on_end  # told each job's end recorded here (the metrics)
        self._queue_lost = False  # the queue was unreachable (said once, and once when it is back)

    @property
    def running(self) -> list[Running]:
        """The jobs running now, oldest first."""
        with self._running_lock:
            return sorted(self._running.values(), key=lambda r: r.started)

    # -- control -------------------------------------------------------------------------------------
    def start(self) -> None:
        self._settle_finished()
        if not self._preload:
            self._now_ready()
        for slot in range(self.concurrency):
            thread = threading.Thread(target=self._loop, args=(slot,), name=f"zimage-worker-{slot}", daemon=True)
            self._threads.append(thread)
            thread.start()
        threading.Thread(target=self._keep_leases, name="zimage-worker-heartbeat", daemon=True).start()

    def _keep_leases(self) -> None:
        """Renew this worker's leases every third of their length, and put back the jobs of workers whose
        leases ran out (dead elsewhere, or stopped sending heartbeats)."""
        self._beat()
        while not self._stopping.wait(self.lease_s / 3):
            asked = lease_clock()
            try:
                self.store.heartbeat(self.id, self.lease_s)
                self._renewed(asked, lease_clock())
                recovered = self.store.recover(cause="its worker stopped renewing its lease")
            except QueueUnavailable as exc:
                self._lost_queue(exc)
                continue
            except Exception:  # a busy queue: the next beat tries again
                log.exception("could not renew the leases of worker %s", self.id)
                continue
            self._beat()
            for job in recovered:
                log.warning("prompt %s lost its worker %s: %s", job.id, job.worker or "(unnamed)",
                            "queued again" if job.state == "pending" else "failed, not run again")  # fmt: skip
            if recovered:
                self.listener.queue_changed()
                self.notify()

    def _renewed(self, asked: float, done: float) -> None:
        """A heartbeat asked for at `asked`, answered at `done`, renewed the leases this worker held as it ran.
        Only runs whose lease surely held until it was answered are known to be among them: one that may
        have run out (the worker froze, the heartbeat was slow) may be another worker's now, and is asked
        about from then on."""
        with self._running_lock:
            for run in self._running.values():
                if done < run.leased_until - self.lease_s / 2:
                    run.leased_until = asked + self.lease_s

    def _beat(self) -> None:
        if self._on_beat is None:
            return
        try:
            self._on_beat()
        except QueueUnavailable as exc:
            self._lost_queue(exc)
        except Exception:  # the register is for people to read: never worth stopping the beats
            log.exception("could not say that worker %s is alive", self.id)

    def _lost_queue(self, exc: Exception) -> None:
        if not self._queue_lost:
            self._queue_lost = True
            log.error("worker %s lost the queue (%s); trying again every second", self.id, exc)

    def _found_queue(self) -> None:
        if self._queue_lost:
            self._queue_lost = False
            log.warning("worker %s reached the queue again", self.id)

    def notify(self) -> None:
        """A job was queued: wake the worker if it sleeps."""
        with self._wake:
            self._wakes += 1
            self._wake.notify_all()

    def stop(self, timeout: float | None = None) -> bool:
        """Take no new job; let running ones finish within `timeout`, then interrupt them and put them back
        in the queue for the next start (a shutdown is not the prompt's failure). True if idle."""
        self._stopping.set()
        self.notify()
        running = self.running
        if running:
            log.warning(
                "stopping: waiting up to %s s for %s",
                timeout,
                ", ".join(f"prompt {r.job.id}" for r in running),
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            self._cut_off.set()
            for late in self.running:
                log.warning(
                    "prompt %s did not finish within the %s s grace: interrupting it, to be queued again for the "
                    "next start",
                    late.job.id,
                    timeout,
                )
            self.executor.interrupt()
            for thread in self._threads:
                thread.join(30)
        stuck = [r.job.id for r in self.running]
        for job_id in stuck:
            log.error("prompt %s did not stop; the next start finds it running and queues it again", job_id)
        return not any(t.is_alive() for t in self._threads)

    def _warm_up(self) -> None:
        """Load the default model (zimage-nano) and run it once at its size with one step, on the first job
        thread before it takes a job (the others, with concurrency above 1, start at once; a job needing
        the same model waits for it, it is never loaded twice): the first prompt finds the weights loaded
        and the code warm."""
        started = time.monotonic()
        try:
            prompt, targets = warm_up_prompt()
            result = self.executor.run(PRELOAD_ID, prompt, targets)
            if result.ok:
                log.info("the default model is loaded (%.1f s)", time.monotonic() - started)
            else:
                log.warning("could not preload the default model: %s", (result.error or {}).get("exception_message"))
        except Exception:  # a failed preload only costs the first prompt its load time
            log.exception("could not preload the default model")
        self._now_ready()

    def _now_ready(self) -> None:
        self.ready.set()
        if self._on_ready is not None:
            self._on_ready()

    def _settle_finished(self) -> None:
        """Files noted by runs whose end was recorded just before a crash are theirs: settle them. Those
        of runs never finished are removed when the prompt runs again."""
        for prompt_id in self.executor.unsettled():
            try:
                job = self.store.get(prompt_id)
            except QueueUnavailable as exc:  # left for the next start: a re-run settles its own files
                self._lost_queue(exc)
                return
            if job is None or job.state not in ("pending", "running"):
                self.executor.settle_left_over(prompt_id)

    def state(self) -> str:
        if self._stopping.is_set():
            return "stopped"
        return "ready" if self.ready.is_set() else "starting"

    def executing(self) -> list[Executing]:
        return [Executing(r.job.id, r.job.extra_data.get("client_id"), r.node, r.job.owner) for r in self.running]

    def free(self, caches: bool = True) -> None:
        self.executor.free(caches)

    def ends_wanted(self, count: int) -> None:
        """Job ends are told to the listener as they happen, in this process: nothing to change."""

    def device_stats(self) -> dict[str, object]:
        return self.executor.device_stats()

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Interrupt `prompt_id` if it runs here, or every running job. True if one was interrupted.

        A prompt this worker has claimed but not begun yet is stopped as it begins (then False)."""
        if prompt_id is None:
            with self._running_lock:
                runs = list(self._running.values())
            for run in runs:
                run.stop.set()
            return self.executor.interrupt() or bool(runs)  # the executor's own: the warm-up run too
        if self._stop_running(prompt_id):
            return True
        try:
            job = self.store.get(prompt_id)
        except QueueUnavailable:
            return False
        if job is None or job.state != "running" or job.worker != self.id:
            return False
        with self._running_lock:
            if prompt_id not in self._running:
                now = time.monotonic()
                self._asked = {i: t for i, t in self._asked.items() if now - t < ASKED_STOP_S}
                self._asked[prompt_id] = now
                return False
        return self._stop_running(prompt_id)  # it began while the queue was read

    def _stop_running(self, prompt_id: str, timeout: str | None = None) -> bool:
        with self._running_lock:
            running = self._running.get(prompt_id)
        if running is not None:
            running.stop.set(timeout)
        return running is not None

    # -- the loop ------------------------------------------------------------------------------------
    def _loop(self, slot: int = 0) -> None:
        if slot == 0 and self._preload:
            self._warm_up()
        job: Job | None = None
        while job is not None or not self._stopping.is_set():
            if job is None:
                wakes = self._wakes  # a wake-up from here on means: look again before sleeping
                try:
                    asked = lease_clock()
                    job = self.store.claim(self.id, self.lease_s)
                    if job is not None:
                        self._claimed_at[job.id] = asked
                except QueueUnavailable as exc:
                    self._lost_queue(exc)
                    self._stopping.wait(1.0)
                    continue
                self._found_queue()
            if job is None:
                if self._on_idle is not None:
                    try:
                        self._on_idle()
                    except Exception:  # a report for the server: never worth the worker's thread
                        log.exception("worker %s could not report that it is idle", self.id)
                with self._wake:
                    # A job queued after the claim looked woke nobody (this thread was not waiting yet):
                    # without this check it would wait for the timeout.
                    if not self._stopping.is_set() and self._wakes == wakes:
                        self._wake.wait(timeout=IDLE_WAIT_S)
                continue
            current, job = job, None
            try:
                job = self._run(current)
            except Exception:  # never let one job kill the worker; the job is recorded as failed
                log.exception("job %s failed outside the executor", current.id)
                self._record_failure(current, "internal error while running the prompt; see the server log")

    def _run(self, job: Job) -> Job | None:
        """Run `job`, record it, and return the next job, claimed in the same transaction."""
        running = Running(job, leased_until=self._claimed_at.pop(job.id, 0.0) + self.lease_s)
        with self._running_lock:
            self._running[job.id] = running
            if self._asked.pop(job.id, None) is not None:  # cancelled between its claim and now
                running.stop.set()
        self.listener.queue_changed()
        if self.job_timeout is not None:
            self._deadlines.add(job.id, self.job_timeout)

        def emit(event: str, data: dict[str, Any]) -> None:
            if event == "executing":
                running.node = data.get("node")
            self._tell(job, event, data)

        if job.attempts > 1:  # run before and never finished: what that run wrote goes first
            self.executor.discard_outputs(job.id)

        tally = ImageTally(self.store, job) if job.owner else None
        try:
            identity = Identity.of_job(job.owner, job.context, self.executor.limits)
            result = self.executor.run(
                job.id,
                job.prompt,
                job.outputs,
                job.extra_data,
                emit,
                identity,
                lambda: self._holds(job.id, running),
                tally,
                running.stop,
                self.listener.listening,
            )
        finally:
            self._deadlines.remove(job.id)
        closing = result.closing  # said once the history holds the run
        if result.status == "interrupted" and self._cut_off.is_set():
            self.store.requeue(job.id)
            self.executor.discard_outputs(job.id)
            log.warning("prompt %s was stopped by the shutdown and is queued again for the next start", job.id)
            with self._running_lock:
                del self._running[job.id]
            if closing is not None:
                self._tell(job, *closing)
            return None
        if not self._holds(job.id, running):
            # The lease ran out (a frozen or cut-off worker) and another worker runs the prompt: nothing of
            # this run counts, neither its end, its events nor its files (the fence kept their final names).
            log.warning(
                "prompt %s was taken by another worker when this one's lease ran out: its run here is dropped", job.id
            )
            with self._running_lock:
                del self._running[job.id]
            return None
        state = {"success": "success", "error": "error", "interrupted": "interrupted"}[result.status]
        entry = {"outputs": result.outputs, "messages": result.messages}
        next_job = self._record(job.id, state, entry)
        if tally is not None:
            self._settle(tally)
        self._ended(job, state, running.started, result.executed)
        self.executor.settle_outputs(job.id)
        if self._stopping.is_set():
            log.warning("prompt %s ended (%s) while the server was stopping", job.id, state)
        try:
            with self._running_lock:
                del self._running[job.id]
            if closing is not None:
                self._tell(job, *closing)
            self.listener.queue_changed()
            self._tell(job, "executing", {"node": None, "prompt_id": job.id})
        except Exception:  # the next job is claimed already: it must still run
            log.exception("could not report the end of job %s", job.id)
        return next_job

    def _holds(self, job_id: str, running: Running) -> bool:
        """Whether this worker still holds the job (the output fence: asked before each final file name).

        Within the first half of the lease since it was taken or last renewed, the answer is yes without
        asking the queue: a lease ends only by running out, and the half left over covers a queue whose
        clock runs apart from this process's (Redis', another host's). Past that (a frozen process, beats
        that failed) the queue is asked. While the queue cannot be reached it is taken to hold it: the
        finish, fenced too, decides then."""
        if lease_clock() < running.leased_until - self.lease_s / 2:
            return True
        try:
            return self.store.holds(job_id, self.id)
        except QueueUnavailable:
            return True

    def _record(self, job_id: str, state: str, entry: dict[str, Any]) -> Job | None:
        """The job's end in the queue, and the next job claimed with it. While the queue cannot be reached
        the result is kept and the write tried again every second: a finished image is not thrown away
        for an outage. If the lease ran out meanwhile and another worker took the job, the queue records
        nothing from this one (fencing): the other worker's end is the one kept. Given up only when a
        shutdown cuts the worker off."""
        while True:
            try:
                asked = lease_clock()
                next_job = self.store.finish(
                    job_id, state, entry, claim_next=not self._stopping.is_set(), worker=self.id, lease_s=self.lease_s
                )
                if next_job is not None:
                    self._claimed_at[next_job.id] = asked
            except QueueUnavailable as exc:
                self._lost_queue(exc)
                if self._cut_off.wait(1.0):
                    raise
                continue
            self._found_queue()
            return next_job

    def _settle(self, tally: ImageTally) -> None:
        try:
            tally.settle()
        except QueueUnavailable as exc:  # the owner keeps the charge; the job's end is recorded already
            log.warning("could not give back the images prompt %s did not make: %s", tally.job.id, exc)

    def _ended(self, job: Job, state: str, started: float, executed: list[str]) -> None:
        nodes: dict[str, int] = {}
        for node_id in executed:
            class_type = str(job.prompt.get(node_id, {}).get("class_type", "?"))
            nodes[class_type] = nodes.get(class_type, 0) + 1
        end = JobEnd(state, time.monotonic() - started, time.time() - job.created if job.created else 0.0, nodes)
        try:
            self._on_end(end)
        except Exception:  # metrics never cost a job
            log.exception("could not count the end of job %s", job.id)

    def _tell(self, job: Job, event: str, data: dict[str, Any]) -> None:
        self.listener.job_event(job.id, job.extra_data.get("client_id"), event, data, job.owner)

    def _time_out(self, job_id: str) -> None:
        """A job past its time limit: the executor stops it and reports the limit as the run's error."""
        self._stop_running(job_id, f"the prompt ran longer than the {self.job_timeout:g} s limit and was stopped")

    def _record_failure(self, job: Job, message: str) -> None:
        data = execution_error(job.id, message, "InternalError")
        self.store.finish(job.id, "error", {"outputs": {}, "messages": [["execution_error", data]]})
        self._ended(job, "error", time.monotonic(), [])
        self.executor.discard_outputs(job.id)  # the history lists none of them
        with self._running_lock:
            self._running.pop(job.id, None)
        self._tell(job, "execution_error", data)
        self.listener.queue_changed()
        self._tell(job, "executing", {"node": None, "prompt_id": job.id})
