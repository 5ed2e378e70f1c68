"""The device worker in a process of its own.

The server's event loop and the prompts it runs then never share one interpreter lock: serving requests does
not slow a sampling loop, nor the other way round, and the two use two cores. A worker that dies (a driver
fault, the OOM killer) takes no request and no queued prompt with it.

The child opens its own connection to the queue's SQLite file (claims are atomic, so the file is the only
hand-over) and runs a `Worker` there. One pipe carries typed messages (`worker/messages.py`), child to
parent and in order (a few at a time): job events, queue changes and device statistics; parent to child:
wake, interrupt, free, report and stop. A wake is sent only while the child says, by a flag in shared
memory, that it found no job (it sets the flag, then looks at the queue once more, so a job queued meanwhile
is not missed). Events go only to sockets, so while none is connected to the parent (a number in shared
memory says how many are) the child sends only each job's end (`_PipeListener`): what runs is read from the
queue file, and the node a prompt is on is asked of the child when a socket connects. The child dies with
the parent (Linux's parent-death signal, else the pipe's end). A child that dies unexpectedly is started
again once its running jobs are put back or failed, as crash recovery does at start.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from zimage_serve.metrics import JobEnd, observe_job
from zimage_serve.queue.contract import JobQueue
from zimage_serve.queue.sqlite_queue import SQLiteQueue
from zimage_serve.worker.build import WorkerConfig, build_executor, build_worker
from zimage_serve.worker.loop import Listener
from zimage_serve.worker.messages import (
    DeviceStats,
    Executing,
    Free,
    Interrupt,
    JobEnded,
    JobEvent,
    QueueChanged,
    Ready,
    Report,
    RunningNow,
    Stop,
    ToServer,
    ToWorker,
    Wake,
)
from zimage_serve.workflow.events import CLOSING

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1
REPORT_TIMEOUT_S = 2.0
MAX_RESTART_DELAY_S = 5.0


def wait_for_child(process: multiprocessing.process.BaseProcess, timeout: float | None) -> bool:
    """Wait for a worker process told to stop: its grace, then the 30 s it gives a job it interrupted, then
    SIGKILL. True if it ended by itself, cleanly."""
    process.join(None if timeout is None else timeout + 35)
    clean = not process.is_alive() and process.exitcode == 0
    if process.is_alive():
        process.kill()
        process.join(10)
    return clean


def child_setup(parent_pid: int, log_level: int) -> None:
    """A worker child's start: it dies with its parent, leaves signals to it (Ctrl-C reaches the whole
    group; the parent decides), and logs as the parent does."""
    die_with(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(levelname)s [worker] %(name)s: %(message)s")


def restart_delay(quick_failures: int) -> float:
    """Seconds before a dead worker is started again, after `quick_failures` deaths within a minute of
    starting: none for the first (a one-off crash), then doubling from 0.5 s up to MAX_RESTART_DELAY_S."""
    if quick_failures <= 1:
        return 0.0
    return min(MAX_RESTART_DELAY_S, 0.5 * 2.0 ** (quick_failures - 2))


@dataclass
class _Report:
    """The child's answer to "what runs now", awaited by `WorkerProcess.executing`."""

    done: threading.Event = field(default_factory=threading.Event)
    running: list[Executing] = field(default_factory=list)


class WorkerProcess:
    """The parent's handle: the same control surface as `Worker`, carried over the pipe."""

    def __init__(self, config: WorkerConfig, listener: Listener, store: JobQueue) -> None:
        self.config, self.listener, self.store = config, listener, store
        self._lock = threading.Lock()  # guards the pipe's sending end and _reports
        self._connection: Connection | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._reader: threading.Thread | None = None
        self._reports: dict[int, _Report] = {}
        self._next_report = 0
        self._stats: dict[str, object] = {}
        self._stopping = threading.Event()
        self._child_ready = False  # the child loaded the default model (or has nothing to preload)
        self._started = 0.0
        self._quick_failures = 0
        # Sockets connected to the parent, read by the child before each event; shared memory, so a socket
        # that connects is seen by the next event the child sends, with no message in between.
        self._audience = multiprocessing.get_context("spawn").Value("i", 0, lock=False)
        # Set by the child as it goes idle (then it looks at the queue once more before it sleeps), cleared
        # by the server as it sends a wake-up: no message each way to say so.
        self._idle = multiprocessing.get_context("spawn").Value("i", 0, lock=False)
        # How many on the server wait for job ends as they happen (`ends_wanted`): while none do, the child
        # sends them a little later, several in one write.
        self._ends_wanted = multiprocessing.get_context("spawn").Value("i", 0, lock=False)

    # -- control ---------------------------------------------------------------------------------------
    def start(self) -> None:
        context = multiprocessing.get_context("spawn")  # no fork: threads and CUDA do not survive one
        parent_end, child_end = context.Pipe(duplex=True)
        process = context.Process(
            target=_child_main,
            args=(self.config, child_end, os.getpid(), self._audience, self._idle, self._ends_wanted),
            name="zimage-worker",
            daemon=True,
        )
        process.start()
        child_end.close()
        self._started = time.monotonic()
        with self._lock:
            self._process, self._connection = process, parent_end
        self._reader = threading.Thread(target=self._read, args=(parent_end, process), name="zimage-worker-events")
        self._reader.daemon = True
        self._reader.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Take no new job; let running ones finish within `timeout` (then interrupt them). True if idle."""
        self._stopping.set()
        with self._lock:
            self._send_locked(Stop(timeout))
            process, starting = self._process, not self._child_ready
        if process is None:
            return True
        if starting and self.store.count("running") == 0:
            # A child still importing and loading its model holds no job, and would read the Stop only once
            # loaded, seconds from now. (A job it claims this instant is found running and queued again
            # at the next start, as after any crash.)
            process.kill()
            process.join(10)
            clean = True
        else:
            clean = wait_for_child(process, timeout)
        if self._reader is not None:
            self._reader.join(5)
        return clean

    def state(self) -> str:
        """ "ready", "starting" (the child loads the models' code and the default model), or "stopped"."""
        if self._stopping.is_set():
            return "stopped"
        return "ready" if self._child_ready and self._connection is not None else "starting"

    def audience_changed(self, sockets: int) -> None:
        self._audience.value = sockets

    def ends_wanted(self, count: int) -> None:
        self._ends_wanted.value = count

    def notify(self) -> None:
        """Wake the child only if it said it is idle: a message per submission would fill the pipe
        faster than a busy child reads it, and block the server on the send."""
        with self._lock:
            if self._idle.value:  # read after the job's commit; the child sets it before it looks again
                self._idle.value = 0
                self._send_locked(Wake())

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Sent whatever the queue file says (a prompt may have started a moment ago); True if one was
        running when asked."""
        with self._lock:
            self._send_locked(Interrupt(prompt_id))
        if prompt_id is None:
            return self.store.count("running") > 0
        job = self.store.get(prompt_id)
        return job is not None and job.state == "running"

    def free(self, caches: bool = True) -> None:
        with self._lock:
            self._send_locked(Free(caches))

    def executing(self) -> list[Executing]:
        """Asked of the child, which alone knows each prompt's current node (it sends no events while no
        socket listens); blocks up to REPORT_TIMEOUT_S, then answers that nothing is known to run."""
        report = _Report()
        with self._lock:
            if self._connection is None:  # no child (being restarted): nothing runs
                return []
            token, self._next_report = self._next_report, self._next_report + 1
            self._reports[token] = report
            self._send_locked(Report(token))
        if not report.done.wait(REPORT_TIMEOUT_S):
            log.warning("the worker process did not say what it runs within %s s", REPORT_TIMEOUT_S)
        with self._lock:
            self._reports.pop(token, None)
        return report.running

    def device_stats(self) -> dict[str, object]:
        """As the child last reported them (when it started, and whenever its queue ran dry); before
        its first report, the configured device with no memory figures (the parent loads no torch)."""
        if self._stats:
            return dict(self._stats)
        device = self.config.run.device
        kind, _, index = device.partition(":")
        return {
            "name": device,
            "type": kind,
            "index": int(index) if index.isdigit() else 0,
            "vram_total": 0,
            "vram_free": 0,
            "torch_vram_total": 0,
            "torch_vram_free": 0,
        }

    # -- parent side -----------------------------------------------------------------------------------
    def _send_locked(self, message: ToWorker) -> None:
        if self._connection is not None:
            with contextlib.suppress(OSError, ValueError):  # a dead child: the reader starts a new one
                self._connection.send(message)

    def _read(self, connection: Connection, process: multiprocessing.process.BaseProcess) -> None:
        while True:
            try:
                batch = connection.recv()
            except (EOFError, OSError):
                break
            for message in batch:
                try:
                    self._dispatch(message)
                except Exception:  # a listener's failure must not stop the events of other prompts
                    log.exception("could not deliver %s from the worker", type(message).__name__)
        connection.close()
        process.join(10)
        with self._lock:
            self._connection = None
            self._child_ready = False
            for report in self._reports.values():  # nothing runs in a dead child
                report.done.set()
        if self._stopping.is_set():
            return
        cause = f"the worker process died (exit code {process.exitcode})"
        log.error("%s; starting it again", cause)
        for job in self.store.recover(cause=cause):
            log.warning(
                "prompt %s was running: %s",
                job.id,
                "queued again" if job.state == "pending" else f"failed after {job.attempts} tries, not run again",
            )
        self.listener.queue_changed()
        # A child that keeps dying at once (a broken install, a device that fails on start) is not
        # restarted in a tight loop: wait 0.5, 1, 2, 4, then 5 s at most, while it lives under a minute.
        self._quick_failures = self._quick_failures + 1 if time.monotonic() - self._started < 60 else 0
        if not self._stopping.wait(restart_delay(self._quick_failures)):
            self.start()

    def _dispatch(self, message: ToServer) -> None:
        match message:
            case JobEvent(prompt_id, client_id, event, data, owner):
                self.listener.job_event(prompt_id, client_id, event, data, owner)
            case JobEnded(end):
                observe_job(end)
            case RunningNow(token, running):
                with self._lock:
                    report = self._reports.get(token)
                if report is not None:
                    report.running = list(running)
                    report.done.set()
            case QueueChanged():
                self.listener.queue_changed()
            case DeviceStats(stats):
                self._stats = stats
            case Ready():
                self._child_ready = True


HOLD_S = 0.2  # how long the child may hold job ends nobody waits for (then sent together)


# -- child side -----------------------------------------------------------------------------------------
class _PipeListener:
    """The child's worker reports through the pipe, each write made by the thread that has the message, one
    at a time (a thread of its own to write them cost more than the writes: a thread switch, and a turn of
    the interpreter lock, per message).

    A job's end (its closing event, and its count for the metrics) is sent as it happens only while someone
    on the server waits for it: a socket or an event stream (`audience`), a route waiting for its job, the
    webhooks or the uploads (`ends_wanted`). Otherwise it is held, and sent with the next message or within
    HOLD_S, several in one write: a job's two messages cost both processes more than the job's own
    bookkeeping, and nobody was waiting to read them sooner."""

    def __init__(self, connection: Connection, audience: Any, ends_wanted: Any) -> None:
        self.connection, self.audience, self.ends_wanted = connection, audience, ends_wanted
        self._lock = threading.Lock()  # one write on the pipe at a time
        self._held: list[ToServer] = []
        self._holding = threading.Event()  # set while messages are held: the flusher sends them in HOLD_S
        threading.Thread(target=self._flush_held, name="zimage-worker-flush", daemon=True).start()

    def send(self, message: ToServer) -> None:
        with self._lock:
            batch, self._held = [*self._held, message], []
            self._write(batch)

    def ended(self, end: JobEnd) -> None:
        self._hold(JobEnded(end))

    def flush(self) -> None:
        with self._lock:
            batch, self._held = self._held, []
            if batch:
                self._write(batch)

    def job_event(
        self, prompt_id: str, client_id: str | None, event: str, data: dict[str, Any], owner: str = ""
    ) -> None:
        if self.audience.value:
            self.send(JobEvent(prompt_id, client_id, event, data, owner))
        elif event in CLOSING:  # a job's end: for the server's own waiters, and its bookkeeping
            message = JobEvent(prompt_id, client_id, event, data, owner)
            if self.ends_wanted.value:
                self.send(message)
            else:
                self._hold(message)

    def queue_changed(self) -> None:
        if self.audience.value:  # a status broadcast, to sockets only
            self.send(QueueChanged())

    def listening(self) -> bool:
        return bool(self.audience.value)

    def _hold(self, message: ToServer) -> None:
        with self._lock:
            self._held.append(message)
        self._holding.set()

    def _flush_held(self) -> None:
        while True:
            self._holding.wait()
            time.sleep(HOLD_S)
            self._holding.clear()  # before the flush: a message held after it sets it again
            self.flush()

    def _write(self, batch: list[ToServer]) -> None:
        try:
            self.connection.send(batch)
        except (OSError, ValueError):  # the parent is gone; its successor recovers what was running
            os._exit(1)


def die_with(parent_pid: int) -> None:
    """Ask Linux to kill this process when the parent dies, then check it did not die already."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)


def _child_main(
    config: WorkerConfig, connection: Connection, parent_pid: int, audience: Any, idle: Any, ends_wanted: Any
) -> None:
    child_setup(parent_pid, config.log_level)
    store = SQLiteQueue(Path(config.queue))
    listener = _PipeListener(connection, audience, ends_wanted)
    executor = build_executor(config)
    last_stats = 0.0

    def report_idle() -> None:  # whenever the queue runs dry; statistics at most once a second
        nonlocal last_stats
        if time.monotonic() - last_stats >= 1.0:
            last_stats = time.monotonic()
            listener.send(DeviceStats(executor.device_stats()))
        idle.value = 1  # from now on the server wakes this worker for each job it queues ...
        if store.count("pending"):  # ... and one queued before it could see the flag is found here
            idle.value = 0
            worker.notify()

    listener.send(DeviceStats(executor.device_stats()))
    worker = build_worker(
        config,
        store,
        listener,
        executor,
        on_idle=report_idle,
        on_ready=lambda: listener.send(Ready()),
        on_end=listener.ended,
    )
    worker.start()
    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):
            os._exit(1)
        match message:
            case Wake():
                worker.notify()
            case Interrupt(prompt_id):
                worker.interrupt(prompt_id)
            case Free(caches):
                executor.free(caches)
            case Report(token):
                listener.send(RunningNow(token, worker.executing()))
            case Stop(timeout):
                clean = worker.stop(timeout)
                store.close()
                listener.flush()
                os._exit(0 if clean else 3)
