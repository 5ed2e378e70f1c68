"""A stored job as Comfy API v2's `Job`: its status from the queue's state, its position among its owner's
waiting jobs, its progress while watched, its outputs as assets, its error, and the links to follow.

Any job reads this way, whichever API submitted it. Outputs are assets with ids derived from the job and
the file (`records.contract.output_asset_id`), recorded the first time they are shown, so an output's id
is the same on every read, on every API node, after every restart.
"""

from __future__ import annotations

import datetime
import mimetypes
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

from zimage_serve.identity import ADMIN
from zimage_serve.queue.contract import JobQueue
from zimage_serve.queue.jobs import Job
from zimage_serve.records.contract import Asset, Place, Records, output_asset_id
from zimage_serve.server.stored_outputs import FileLinks, StoredOutputs
from zimage_serve.server.v2.feeds import JobFeeds
from zimage_serve.workflow.folders import FILE_TYPES, Folders, UnknownFileError, contained

STATUS_OF = {
    "pending": "queued",
    "running": "running",
    "success": "succeeded",
    "error": "failed",
    "interrupted": "canceled",
}
STATES_OF = {
    "queued": ("pending",),
    "running": ("running",),
    "canceling": ("running",),
    "succeeded": ("success",),
    "failed": ("error",),
    "canceled": ("interrupted",),
    "expired": (),
}
TERMINAL = ("succeeded", "failed", "canceled", "expired")
# ComfyUI's output lists (a node's `ui`) and the kind v2 calls each.
KINDS = {"images": "image", "gifs": "video", "videos": "video", "audio": "audio", "text": "text", "latents": "latent"}
URL_LIFETIME_S = 3600  # content links are checked against the caller's token; this is how long v2 says they hold
EXTRA_KEY = "comfy_api_v2"  # where a v2 job's metadata and priority are kept in its extra_data
REMEMBERED = 100_000  # output ids known to be recorded, before the memory of them starts again


def iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def job_space(job: Job) -> str | None:
    """The user space a job's files are in (None: the shared folders, where an admin's jobs write)."""
    return None if job.context.role == ADMIN or not job.owner else job.owner


def content_url(origin: str, asset_id: str) -> str:
    return f"{origin}/api/v2/assets/{asset_id}/content"


def origin_of(base_url: str) -> str:
    """The scheme and host a request reached (Starlette's `request.base_url`), without the final slash."""
    return base_url.rstrip("/")


def links(job_id: str) -> dict[str, str]:
    base = f"/api/v2/jobs/{job_id}"
    return {"self": base, "events": f"{base}/events", "cancel": f"{base}/cancel"}


class JobViews:
    def __init__(
        self,
        store: JobQueue,
        records: Records,
        folders: Folders,
        feeds: JobFeeds,
        retention_s: float,
        stored: StoredOutputs | None = None,
    ) -> None:
        self.store, self.records, self.folders, self.feeds = store, records, folders, feeds
        self.stored = stored or StoredOutputs(None, None)
        self.retention_s = retention_s
        self._recorded: dict[str, str | None] = {}  # output ids known to be recorded, and their hashes
        self._lock = threading.Lock()

    def status(self, job: Job) -> str:
        status = STATUS_OF[job.state]
        if status == "running" and job.id in self.feeds.canceling:
            return "canceling"
        if status != "running":  # ended: its end may not have reached this node as an event
            self.feeds.canceling.discard(job.id)
        return status

    def view(self, job: Job, owner_view: str | None, origin: str) -> dict[str, Any]:
        """The v2 `Job` (a thread's work: it reads the queue and the files); `owner_view` is the owner whose
        waiting jobs the position counts (None: everyone's, for an admin); `origin` (scheme and host, as the
        client reached this server) begins the outputs' content URLs, which v2 has absolute."""
        status = self.status(job)
        feed = self.feeds.feed(job.id)
        if job.state in ("pending", "running"):
            ui = feed.executed if feed is not None else []
        else:
            ui = [(node, out) for node, out in (job.result.get("outputs") or {}).items() if isinstance(out, dict)]
        started, finished = job.started, job.finished
        found: dict[str, Any] = {
            "id": job.id,
            "status": status,
            "created_at": iso(job.created),
            "started_at": iso(started),
            "completed_at": iso(finished) if status in TERMINAL else None,
            "expires_at": iso((finished or job.created) + self.retention_s),
            "queue_position": self.store.position(job.id, owner_view) if status == "queued" else None,
            "progress": self._progress(job, status, feed),
            "outputs": self.outputs(job, ui, origin),
            "error": error_of(job) if status == "failed" else None,
            "urls": links(job.id),
            "metrics": {
                "queue_ms": None if started is None else max(0, round((started - job.created) * 1000)),
                "execution_ms": None if started is None or finished is None else round((finished - started) * 1000),
            },
            "outputs_reused": any(event == "execution_cached" and data.get("nodes") for event, data in _messages(job)),
        }
        extra = job.extra_data.get(EXTRA_KEY) if isinstance(job.extra_data, dict) else None
        if isinstance(extra, dict):
            if "metadata" in extra:
                found["metadata"] = extra["metadata"]
            if "priority" in extra:
                found["priority"] = extra["priority"]
        return found

    def _progress(self, job: Job, status: str, feed: Any) -> dict[str, Any] | None:
        if status == "queued":
            return None
        if feed is not None and feed.progress is not None and status in ("running", "canceling"):
            return dict(feed.progress)
        total = max(len(job.prompt), 1)
        done = total if status == "succeeded" else 0
        return {
            "value": 1.0 if status == "succeeded" else 0.0,
            "nodes_done": done,
            "nodes_total": total,
            "current_node": None,
            "current_node_class": None,
            "step": None,
            "steps": None,
            "message": None,
        }

    # -- outputs -------------------------------------------------------------------------------------
    def outputs(self, job: Job, ui: Iterable[tuple[str, dict[str, Any]]], origin: str) -> list[dict[str, Any]]:
        """Each file the job's nodes listed, as v2's `Output` (recorded as an asset the first time)."""
        shown = []
        ended = job.state not in ("pending", "running")
        links = self.stored.job_links(job.id) if ended and self.stored.enabled else {}
        for node_id, output in ui:
            for key, items in output.items():
                kind = KINDS.get(key)
                if kind is None or not isinstance(items, list):
                    continue
                for item in items:
                    if isinstance(item, dict) and isinstance(item.get("filename"), str):
                        shown.append(self._output(job, node_id, kind, item, origin, links))
        return shown

    def _output(
        self, job: Job, node_id: str, kind: str, item: dict[str, Any], origin: str, links: FileLinks
    ) -> dict[str, Any]:
        """v2's `Output`; its URL is the object's in the output store once the file is stored there (a
        public URL is said to hold as long as a signed one would)."""
        filename, subfolder = item["filename"], str(item.get("subfolder") or "")
        folder_kind = str(item["type"]) if item.get("type") in FILE_TYPES else "output"
        asset_id = output_asset_id(job.id, folder_kind, subfolder, filename)
        place = Place(folder_kind, subfolder, filename, job_space(job) or "")
        stored = links.get((subfolder, filename)) if folder_kind == "output" else None
        size = stored.size if stored is not None else _size(self.file_of(place)) or 0  # an emptied file: the object's
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        digest = self._record(job, asset_id, node_id, place, size, content_type)
        url, expires = (content_url(origin, asset_id), time.time() + URL_LIFETIME_S) if stored is None else (
            stored.url, stored.expires_at or time.time() + URL_LIFETIME_S)  # fmt: skip
        return {
            "node_id": node_id,
            "name": filename,
            "type": kind,
            "content_type": content_type,
            "size_bytes": size,
            "id": asset_id,
            "hash": digest,
            "url": url,
            "url_expires_at": iso(expires),
            "job_id": job.id,
        }

    def _record(self, job: Job, asset_id: str, node_id: str, place: Place, size: int, content_type: str) -> str | None:
        """Record an output asset once; its hash, if known."""
        with self._lock:
            if asset_id in self._recorded:
                return self._recorded[asset_id]
        asset = Asset(
            id=asset_id,
            owner=job.owner,
            place=place,
            size=size,
            content_type=content_type,
            created=job.finished or job.created,
            job_id=job.id,
            node_id=node_id,
        )
        stored = self.records.add_asset(asset)
        self.hashed(asset_id, stored.hash)
        return stored.hash

    def hashed(self, asset_id: str, digest: str | None) -> None:
        """An output's hash became known (or it was recorded without one)."""
        with self._lock:
            if len(self._recorded) >= REMEMBERED:
                self._recorded.clear()
            self._recorded[asset_id] = digest

    def file_of(self, place: Place) -> str | None:
        """The file an asset's bytes are in; None when its name would leave its folder."""
        root = self.folders.space(place.space or None).of_type(place.kind)
        if root is None:
            return None
        name = f"{place.subfolder}/{place.filename}" if place.subfolder else place.filename
        try:
            return contained(root, name, "filename")
        except UnknownFileError:
            return None


def error_of(job: Job) -> dict[str, Any]:
    """v2's `JobError` from the run's `execution_error` (the traceback stays in the server's log)."""
    for event, data in _messages(job):
        if event == "execution_error":
            node = data.get("node_id")
            return {
                "code": "node_execution_error" if node is not None else "execution_error",
                "message": str(data.get("exception_message") or "the job failed"),
                "node_id": None if node is None else str(node),
                "class_type": data.get("node_type"),
                "traceback": None,
            }
    return {"code": "execution_error", "message": "the job failed", "node_id": None, "class_type": None}


def _messages(job: Job) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for message in job.result.get("messages") or ():
        if isinstance(message, list | tuple) and len(message) == 2 and isinstance(message[1], dict):
            found.append((str(message[0]), message[1]))
    return found


def _size(path: str | None) -> int | None:
    if path is None:
        return None
    try:
        return os.stat(path).st_size
    except OSError:
        return None
