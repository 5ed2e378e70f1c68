"""What the API asks of the queue: submit a prompt, look at and change the queue, read the history,
and what can be run (node definitions, installed models, the device).

Submission validates the prompt (ComfyUI's errors), numbers it as ComfyUI does (`front`, `number`, the
server counter) and stores it; the worker is woken to run it. The API layer talks to this and to the
store's `Job` records, never to the executor or the node set directly.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from zimage_serve.identity import LOCAL, Identity
from zimage_serve.queue.contract import JobQueue
from zimage_serve.queue.jobs import DuplicateJob, Job, NewJob, QueueFull, Quota, QuotaExceeded
from zimage_serve.worker.messages import Executing
from zimage_serve.workflow.events import now_ms
from zimage_serve.workflow.folders import MODEL_FOLDERS, Folders
from zimage_serve.workflow.image_count import estimated_images
from zimage_serve.workflow.spec import node_info, object_info, prompt_inputs
from zimage_serve.workflow.validate import Validator, error_body
from zimage_serve.workflow.validate import error as validate_error

SENSITIVE_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")


class DeviceWorker(Protocol):
    """Runs the queued jobs on one device: `queue.worker.Worker` (threads in this process) or
    `queue.worker_process.WorkerProcess` (a child process running one)."""

    def start(self) -> None: ...

    def stop(self, timeout: float | None = None) -> bool: ...

    def notify(self) -> None: ...

    def interrupt(self, prompt_id: str | None = None) -> bool: ...

    def free(self, caches: bool = True) -> None: ...

    def executing(self) -> list[Executing]: ...

    def device_stats(self) -> dict[str, object]: ...

    def state(self) -> str: ...

    def ends_wanted(self, count: int) -> None:
        """How many on the server wait for job ends as they happen, beyond its sockets and event streams
        (a route waiting for its job, webhooks, uploads). While none do, a worker that reports across a
        process boundary may send job ends a little later, several at a time."""
        ...


JOINED_PAIRS_UP_TO = 8  # texts in a prompt up to which every ordered pair of them is screened joined


class PromptRejected(Exception):
    """The prompt failed validation: `body` is ComfyUI's 400 answer ({error, node_errors})."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(body["error"]["message"])
        self.body = body


class PromptBlocked(PromptRejected):
    """A text the prompt would encode matches a rule of the word filter; `rule` is the rule's id (never
    the words, which the answer does not repeat); `text` is the text, for the audit log (kept there as
    `--audit-prompts` says)."""

    def __init__(self, body: dict[str, Any], rule: str, node_id: str, text: str) -> None:
        super().__init__(body)
        self.rule, self.node_id, self.text = rule, node_id, text


class WebhookNames(Protocol):
    def usable(self, name: str, owner: str) -> bool: ...


class TextScreen(Protocol):
    """The word filter (`security.blocklist.Blocklist`): the id of the first rule a text breaks, or None."""

    def match(self, text: str) -> str | None: ...


@dataclass
class Submitted:
    new: NewJob  # the job, its texts and its quota: as the queue is given it, and the job as stored after
    node_errors: dict[str, Any]

    @property
    def job(self) -> Job:
        return self.new.job


Stored = Submitted | QueueFull | DuplicateJob | QuotaExceeded


class QueueService:
    def __init__(
        self,
        store: JobQueue,
        validator: Validator,
        worker: DeviceWorker,
        folders: Folders,
        screen: TextScreen | None = None,
        webhooks: WebhookNames | None = None,
    ) -> None:
        self.store, self.validator, self.worker, self.folders = store, validator, worker, folders
        self.screen = screen
        self.webhooks = webhooks

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
        identity: Identity = LOCAL,
        quota: Quota | None = None,
    ) -> Submitted:
        """Validate and number a prompt for `identity` (their files, their limits; raises PromptRejected,
        PromptBlocked for a filtered text); `enqueue` stores it, within `quota`."""
        # ComfyUI counts every request without an explicit number, even one that then fails validation.
        counter = self.store.next_number() if number is None else None
        validator = self.validator.scoped(self.folders.space(identity.space), identity.limits)
        checked = validator.validate(prompt, partial_targets)
        if not checked.ok:
            raise PromptRejected({"error": checked.error, "node_errors": checked.node_errors})
        if self.screen is not None:
            self._screen(checked.prompt)
        if number is None:
            assert counter is not None
            number = float(-counter) if front else float(counter)
        extra = {k: v for k, v in (extra_data or {}).items() if k not in SENSITIVE_KEYS}
        self._check_webhook(extra.get("webhook"), identity)
        if client_id is not None:
            extra["client_id"] = client_id
        job = Job(prompt_id or str(uuid.uuid4()), number, checked.prompt, extra, checked.outputs)
        if identity.user:
            images = estimated_images(checked.prompt, self.validator.nodes)
            per_day = quota.images_per_day if quota is not None else None
            job.owner, job.context = identity.user, identity.job_context(images, per_day)
        try:
            new = NewJob.of(job, quota)  # here, where a large prompt is off the event loop
        except ValueError as exc:  # a value that is not JSON (NaN) got through: refused, never stored
            raise PromptRejected(error_body("invalid_prompt", "Invalid prompt", str(exc))) from exc
        return Submitted(new, checked.node_errors)

    def _check_webhook(self, name: Any, identity: Identity) -> None:
        """A job may name a registered endpoint it is allowed to use (`extra_data.webhook`), or none."""
        if name is None:
            return
        if not isinstance(name, str) or self.webhooks is None or not self.webhooks.usable(name, identity.user):
            why = f"no endpoint {repr(name)[:80]} this user may use"
            if self.webhooks is None:
                why = "this server keeps no webhook endpoints"
            raise PromptRejected(error_body("invalid_webhook", "Unknown webhook", f"extra_data.webhook: {why}"))

    def _screen(self, prompt: dict[str, Any]) -> None:
        """Every text a text-encoding node would encode goes through the word filter: each alone, then
        joined, so that a word split across nodes (two encoders joined by ConditioningConcat, say) is
        caught too: every ordered pair, and all of them in the prompt's order."""
        assert self.screen is not None
        texts = [
            (node_id, name, text)
            for node_id, node in prompt.items()
            for name in prompt_inputs(self.validator.nodes[node["class_type"]])
            if isinstance(text := node["inputs"].get(name), str) and text
        ]
        joined = list(texts)
        if 1 < len(texts) <= JOINED_PAIRS_UP_TO:
            joined += [(a[0], a[1], a[2] + b[2]) for a in texts for b in texts if a is not b]
        elif len(texts) > JOINED_PAIRS_UP_TO:  # many texts: neighbours only, in either order
            joined += [(a[0], a[1], a[2] + b[2]) for a, b in itertools.pairwise(texts)]
            joined += [(b[0], b[1], b[2] + a[2]) for a, b in itertools.pairwise(texts)]
        if len(texts) > 2:
            joined.append((texts[0][0], texts[0][1], "".join(text for _, _, text in texts)))
        for node_id, name, text in joined:
            rule = self.screen.match(text)
            if rule is not None:
                node = prompt[node_id]
                details = f"{name}: the text matches rule {rule} of this server's word filter"
                problem = validate_error(
                    "prompt_blocked",
                    "Prompt blocked by the word filter",
                    details,
                    {"input_name": name, "rule": rule},
                )
                node_errors = {
                    node_id: {"errors": [problem], "dependent_outputs": [], "class_type": node["class_type"]}
                }
                body = error_body("prompt_blocked", "Prompt blocked by the word filter", details, None, node_errors)
                raise PromptBlocked(body, rule, node_id, text)

    def summary(self, prompt: dict[str, Any]) -> tuple[list[str], dict[str, dict[str, Any]]]:
        """What the audit log keeps of a prompt: the texts it encodes, and each node's other constants."""
        texts: list[str] = []
        parameters: dict[str, dict[str, Any]] = {}
        for node_id, node in prompt.items():
            node_class = self.validator.nodes[node["class_type"]]
            encoded = prompt_inputs(node_class)
            constants = {}
            for name, value in node["inputs"].items():
                if name in encoded and isinstance(value, str):
                    texts.append(value)
                elif isinstance(value, str | int | float | bool):
                    constants[name] = value
            if constants:
                parameters[node_id] = {"class_type": node["class_type"], **constants}
        return texts, parameters

    def enqueue(self, prepared: Sequence[Submitted]) -> list[Stored]:
        """Store prepared prompts in one transaction and wake the worker; each comes back stored or as
        the error that kept it out."""
        stored = self.store.enqueue_many([p.new for p in prepared])
        self.worker.notify()
        return [
            job if isinstance(job, Exception) else Submitted(replace(p.new, job=job), p.node_errors)
            for p, job in zip(prepared, stored, strict=True)
        ]

    # -- the queue and the history ---------------------------------------------------------------------
    def remaining(self, identity: Identity = LOCAL) -> int:
        """Prompts waiting or running: the caller's own (everyone's for an admin), as ComfyUI's
        `queue_remaining` counts them; a user never learns how busy other users are."""
        owner = identity.owner_filter()
        return self.store.count("pending", owner) + self.store.count("running", owner)

    def queue_json(self, limit: int | None = None, offset: int = 0, identity: Identity = LOCAL) -> str:
        """GET /queue's answer, {"queue_running": [...], "queue_pending": [...]}, as JSON text (the
        caller's jobs only, unless an admin); with `limit`, `limit` waiting jobs from `offset` on and a
        "pagination" entry."""
        owner = identity.owner_filter()
        running = ", ".join(self.store.queue_items_json("running", owner=owner))
        pending = ", ".join(self.store.queue_items_json("pending", limit, offset, owner=owner))
        if limit is None:
            return f'{{"queue_running": [{running}], "queue_pending": [{pending}]}}'
        total = self.store.count("pending", owner)
        page = json.dumps({"offset": offset, "limit": limit, "total": total, "has_more": offset + limit < total})
        return f'{{"queue_running": [{running}], "queue_pending": [{pending}], "pagination": {page}}}'

    def executing(self) -> list[Executing]:
        """Each running prompt, who queued it and the node it is on now."""
        return self.worker.executing()

    def get(self, prompt_id: str, identity: Identity = LOCAL) -> Job | None:
        """The job, if it is the caller's to see (another user's is as if it did not exist)."""
        job = self.store.get(prompt_id)
        return job if job is not None and identity.may_see(job.owner) else None

    def finished_count(self, identity: Identity = LOCAL) -> int:
        return self.store.count_finished(identity.owner_filter())

    def history(self, max_items: int | None = None, offset: int | None = None, identity: Identity = LOCAL) -> list[Job]:
        return self.store.history(max_items=max_items, offset=offset, owner=identity.owner_filter())

    def delete_pending(self, ids: Iterable[str] | None = None, identity: Identity = LOCAL) -> int:
        return self.store.delete_pending(ids, identity.owner_filter())

    def delete_history(self, ids: Iterable[str] | None = None, identity: Identity = LOCAL) -> int:
        return self.store.delete_history(ids, identity.owner_filter())

    def interrupt(self, prompt_id: str | None = None, identity: Identity = LOCAL) -> bool:
        """Interrupt `prompt_id`, or every running prompt: the caller's own, all of them for an admin."""
        if identity.admin:
            return self.worker.interrupt(prompt_id)
        if prompt_id is not None:
            job = self.get(prompt_id, identity)
            return job is not None and self.worker.interrupt(prompt_id)
        own = [job.id for job in self.store.running() if job.owner == identity.user]
        return any([self.worker.interrupt(job_id) for job_id in own])

    def cancel(self, prompt_id: str, identity: Identity = LOCAL) -> bool:
        """Take a prompt out of the queue if it waits, or interrupt it if it runs; True if either."""
        if self.get(prompt_id, identity) is None:
            return False
        return bool(self.store.delete_pending([prompt_id])) or self.worker.interrupt(prompt_id)

    def cancel_waiting(self, prompt_id: str, identity: Identity = LOCAL) -> dict[str, Any] | None:
        """End a waiting prompt as interrupted, in the history, without running it: its
        `execution_interrupted` data, or None if it is not the caller's, or not waiting."""
        if self.get(prompt_id, identity) is None:
            return None
        data: dict[str, Any] = {
            "prompt_id": prompt_id,
            "node_id": None,
            "node_type": None,
            "executed": [],
            "timestamp": now_ms(),
        }
        result = {"outputs": {}, "messages": [["execution_interrupted", data]]}
        return data if self.store.cancel_waiting(prompt_id, result) else None

    def usage(self, identity: Identity) -> list[dict[str, Any]]:
        """Today's jobs and images per user, and what each has queued: the caller's own, everyone's for an
        admin."""
        return self.store.usage(identity.owner_filter())

    def free(self, caches: bool = True) -> None:
        """Unload models (see `Executor.free`): with `caches`, drop them and the cached outputs."""
        self.worker.free(caches)

    def worker_state(self) -> str:
        """ "ready", "starting" (loading the models' code and the default model) or "stopped"."""
        return self.worker.state()

    # -- what can be run -------------------------------------------------------------------------------
    def device_stats(self) -> dict[str, object]:
        """The device's entry in /system_stats: name, type, memory."""
        return self.worker.device_stats()

    def object_info(self, identity: Identity = LOCAL) -> dict[str, Any]:
        """Every node's definition, with the file lists the caller may pick from (their own uploads)."""
        return object_info(self.validator.nodes, self.folders.space(identity.space))

    def node_info(self, class_type: str, identity: Identity = LOCAL) -> dict[str, Any] | None:
        node = self.validator.nodes.get(class_type)
        return None if node is None else node_info(class_type, node, self.folders.space(identity.space))

    def model_folders(self) -> list[str]:
        return list(MODEL_FOLDERS)

    def models(self, folder: str) -> list[str] | None:
        """The files (and built-in models) a loader can pick from `folder`; None for an unknown folder."""
        return self.folders.names(folder) if folder in MODEL_FOLDERS else None
