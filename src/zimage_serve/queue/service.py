"""What the API asks of the queue: submit a prompt, look at and change the queue, read the history,
and what can be run (node definitions, installed models, the device).

Submission validates the prompt (ComfyUI's errors), numbers it as ComfyUI does (`front`, `number`, the
server counter) and stores it; the worker is woken to run it. The API layer talks to this and to the
store's `Job` records, never to the executor or the node set directly.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from zimage_serve.queue.store import DuplicateJob, Job, JobStore, QueueFull
from zimage_serve.queue.worker import Executing
from zimage_serve.workflow.folders import MODEL_FOLDERS, Folders
from zimage_serve.workflow.spec import node_info, object_info
from zimage_serve.workflow.validate import Validator
from zimage_serve.workflow.validate import error as validate_error

SENSITIVE_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")


class DeviceWorker(Protocol):
    """Runs the queued jobs on one device: `queue.worker.Worker` (threads in this process) or
    `queue.worker_process.WorkerProcess` (a child process running one)."""

    def start(self) -> None: ...

    def stop(self, timeout: float | None = None) -> bool: ...

    def notify(self) -> None: ...

    def interrupt(self, prompt_id: str | None = None) -> bool: ...

    def free(self) -> None: ...

    def executing(self) -> list[Executing]: ...

    def device_stats(self) -> dict[str, object]: ...

    def state(self) -> str: ...


class PromptRejected(Exception):
    """The prompt failed validation: `body` is ComfyUI's 400 answer ({error, node_errors})."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(body["error"]["message"])
        self.body = body


@dataclass
class Submitted:
    job: Job
    node_errors: dict[str, Any]


class QueueService:
    def __init__(self, store: JobStore, validator: Validator, worker: DeviceWorker, folders: Folders) -> None:
        self.store, self.validator, self.worker, self.folders = store, validator, worker, folders

    def submit(self, prompt: Any, **options: Any) -> Submitted:
        """Validate, number and store one prompt (`prepare`'s options); raises PromptRejected, QueueFull
        or DuplicateJob."""
        [stored] = self.enqueue([self.prepare(prompt, **options)])
        if isinstance(stored, Exception):
            raise stored
        return stored

    def prepare(
        self,
        prompt: Any,
        *,
        client_id: str | None = None,
        extra_data: dict[str, Any] | None = None,
        number: float | None = None,
        front: bool = False,
        prompt_id: str | None = None,
        partial_targets: list[str] | None = None,
    ) -> Submitted:
        """Validate and number a prompt (raises PromptRejected); `enqueue` stores it."""
        # ComfyUI counts every request without an explicit number, even one that then fails validation.
        counter = self.store.next_number() if number is None else None
        checked = self.validator.validate(prompt, partial_targets)
        if not checked.ok:
            raise PromptRejected({"error": checked.error, "node_errors": checked.node_errors})
        if number is None:
            assert counter is not None
            number = float(-counter) if front else float(counter)
        extra = {k: v for k, v in (extra_data or {}).items() if k not in SENSITIVE_KEYS}
        if client_id is not None:
            extra["client_id"] = client_id
        job = Job(prompt_id or str(uuid.uuid4()), number, checked.prompt, extra, checked.outputs)
        try:
            job.encode()  # here, where a large prompt is off the event loop, not in the shared commit
        except ValueError as exc:  # a value that is not JSON (NaN) got through: refused, never stored
            raise PromptRejected(
                {"error": validate_error("invalid_prompt", "Invalid prompt", str(exc)), "node_errors": {}}
            ) from exc
        return Submitted(job, checked.node_errors)

    def enqueue(self, prepared: Sequence[Submitted]) -> list[Submitted | QueueFull | DuplicateJob]:
        """Store prepared prompts in one transaction and wake the worker; each comes back stored or as
        the error that kept it out."""
        stored = self.store.enqueue_many([p.job for p in prepared])
        self.worker.notify()
        return [
            job if isinstance(job, Exception) else Submitted(job, p.node_errors)
            for p, job in zip(prepared, stored, strict=True)
        ]

    # -- the queue and the history ---------------------------------------------------------------------
    def remaining(self) -> int:
        return self.store.count("pending") + self.store.count("running")

    def queue_json(self, limit: int | None = None, offset: int = 0) -> str:
        """GET /queue's answer, {"queue_running": [...], "queue_pending": [...]}, as JSON text; with
        `limit`, `limit` waiting jobs from `offset` on and a "pagination" entry."""
        running = ", ".join(self.store.queue_items_json("running"))
        pending = ", ".join(self.store.queue_items_json("pending", limit, offset))
        if limit is None:
            return f'{{"queue_running": [{running}], "queue_pending": [{pending}]}}'
        total = self.store.count("pending")
        page = json.dumps({"offset": offset, "limit": limit, "total": total, "has_more": offset + limit < total})
        return f'{{"queue_running": [{running}], "queue_pending": [{pending}], "pagination": {page}}}'

    def executing(self) -> list[Executing]:
        """Each running prompt, who queued it and the node it is on now."""
        return self.worker.executing()

    def get(self, prompt_id: str) -> Job | None:
        return self.store.get(prompt_id)

    def finished_count(self) -> int:
        return self.store.count_finished()

    def history(self, max_items: int | None = None, offset: int | None = None) -> list[Job]:
        return self.store.history(max_items=max_items, offset=offset)

    def delete_pending(self, ids: Iterable[str] | None = None) -> int:
        return self.store.delete_pending(ids)

    def delete_history(self, ids: Iterable[str] | None = None) -> int:
        return self.store.delete_history(ids)

    def interrupt(self, prompt_id: str | None = None) -> bool:
        return self.worker.interrupt(prompt_id)

    def cancel(self, prompt_id: str) -> bool:
        """Take a prompt out of the queue if it waits, or interrupt it if it runs; True if either."""
        return bool(self.store.delete_pending([prompt_id])) or self.worker.interrupt(prompt_id)

    def free(self) -> None:
        """Unload models and drop cached outputs; the next prompt loads what it needs again."""
        self.worker.free()

    def worker_state(self) -> str:
        """ "ready", "starting" (loading the models' code and the default model) or "stopped"."""
        return self.worker.state()

    # -- what can be run -------------------------------------------------------------------------------
    def device_stats(self) -> dict[str, object]:
        """The device's entry in /system_stats: name, type, memory."""
        return self.worker.device_stats()

    def object_info(self) -> dict[str, Any]:
        return object_info(self.validator.nodes, self.folders)

    def node_info(self, class_type: str) -> dict[str, Any] | None:
        node = self.validator.nodes.get(class_type)
        return None if node is None else node_info(class_type, node, self.folders)

    def model_folders(self) -> list[str]:
        return list(MODEL_FOLDERS)

    def models(self, folder: str) -> list[str] | None:
        """The files (and built-in models) a loader can pick from `folder`; None for an unknown folder."""
        return self.folders.names(folder) if folder in MODEL_FOLDERS else None
