"""What the API asks of the queue: submit a prompt, look at and change the queue, read the history.

Submission validates the prompt (ComfyUI's errors), numbers it as ComfyUI does (`front`, `number`, the
server counter) and stores it; the worker is woken to run it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from zimage_serve.queue.store import Job, JobStore
from zimage_serve.queue.worker import Worker
from zimage_serve.workflow.validate import Validator

SENSITIVE_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")


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
    def __init__(self, store: JobStore, validator: Validator, worker: Worker) -> None:
        self.store, self.validator, self.worker = store, validator, worker

    def submit(
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
        job = self.store.enqueue(prompt_id or str(uuid.uuid4()), number, checked.prompt, extra, checked.outputs)
        self.worker.notify()
        return Submitted(job, checked.node_errors)

    def remaining(self) -> int:
        return self.store.count("pending") + self.store.count("running")
