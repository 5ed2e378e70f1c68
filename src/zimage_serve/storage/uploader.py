"""Uploading the outbox: each succeeded job's files go to the bucket, with retries, while the server runs.

Every API node runs one uploader; leases keep them apart. A job's files are recorded as stored, and its row
leaves the outbox, only once every file is in the bucket; then its `job.succeeded` webhooks go out, naming
the objects. A try that fails (the store down, refused credentials) is tried again after a backoff with
jitter, until `retry_for_s` after the job's end; then it is given up on and the files stay where they are.
Without --keep-local a file's bytes leave the disk once its object is recorded: an empty file keeps its name
(no later image takes it) and reads of it are served from the bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from zimage_serve import outbox
from zimage_serve.metrics import OUTPUT_UPLOAD_SECONDS, OUTPUT_UPLOADS
from zimage_serve.storage.bucket import Bucket
from zimage_serve.storage.uploads import OutputFile, StoredObject, Upload, Uploads
from zimage_serve.workflow.folders import Folders, UnknownFileError, contained

log = logging.getLogger(__name__)
LEASE_S = 600.0  # a claimed job is this node's for ten minutes: large files on a slow link take a while
KEEP_UP_S = 30.0
DEAD_KEPT_S = 30 * 86400.0  # uploads given up on are listed this long (their files stay on disk)
MISSING_TRIES = 5  # a file the job lists and the disk lacks is looked for this many times (about half a minute)


def file_of(folders: Folders, space: str, subfolder: str, filename: str) -> str | None:
    """The path of a file in a space's output folder; None when the name would leave it."""
    try:
        return contained(folders.space(space or None).output, f"{subfolder}/{filename}" if subfolder else filename,
                         "filename")  # fmt: skip
    except UnknownFileError:
        return None


def emptied(path: str, before: os.stat_result) -> None:
    """The file's bytes leave the disk, its name stays (an empty file), if it is still the file uploaded."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return
    if (now.st_ino, now.st_size, now.st_mtime_ns) != (before.st_ino, before.st_size, before.st_mtime_ns):
        return
    stub = f"{path}.{os.getpid()}.stub"
    with open(stub, "wb"):
        pass
    os.replace(stub, path)  # a reader that has the file open goes on reading the whole image


@dataclass
class Uploader:
    """Empties the upload outbox into the bucket (every API node runs one)."""

    outbox: Uploads
    bucket: Bucket
    folders: Folders
    on_stored: Callable[[str], None] = lambda job_id: None  # a job's files are stored (or given up on): its
    # job.succeeded webhooks may go (called in a worker thread)
    # Each try's outcome (stored, with the keys; retried or dead, with the error), for the audit log.
    on_outcome: Callable[[Upload, str, list[str] | str], None] = lambda upload, outcome, detail: None
    _due: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    def wake(self) -> None:
        """A job may have ended: look now, not at the next poll. Any thread."""
        if self._loop is not None and self._due is not None:
            self._loop.call_soon_threadsafe(self._due.set)

    async def run(self) -> None:
        self._loop, self._due = asyncio.get_running_loop(), asyncio.Event()
        settings = self.bucket.settings

        async def claim() -> list[Upload]:
            return await asyncio.to_thread(self.outbox.claim, time.time(), settings.concurrency * 2, LEASE_S)

        keeping = asyncio.create_task(self._keep_up())
        try:
            await outbox.drain(claim, self._upload, settings.concurrency, settings.poll_s, self._due,
                               "the upload outbox")  # fmt: skip
        finally:
            keeping.cancel()
            await asyncio.gather(keeping, return_exceptions=True)

    async def _keep_up(self) -> None:
        """Say, every half minute, that this node uploads (a cluster's mark expires without it, however long
        the uploads under way take), and forget uploads given up on a month ago, every hour."""
        forgotten_at = 0.0
        while True:
            try:
                await asyncio.to_thread(self.outbox.use, self.bucket.location)
                if time.time() - forgotten_at > 3600:
                    forgotten_at = time.time()
                    await asyncio.to_thread(self.outbox.forget_dead, forgotten_at - DEAD_KEPT_S)
            except Exception:  # the store's database away a moment: the next round says it again
                log.exception("the upload outbox could not be kept up")
            await asyncio.sleep(KEEP_UP_S)

    async def _upload(self, upload: Upload) -> None:
        settings = self.bucket.settings
        try:
            try:
                keys = await asyncio.to_thread(self.store, upload)
            except Exception as exc:  # whatever it was, the try failed: again later, then given up on
                error = f"{type(exc).__name__}: {exc}"
                give_up = time.time() - upload.created >= settings.retry_for_s
                delay = outbox.retry_delay(upload.attempts, settings.first_delay_s, settings.max_delay_s)
                retry_at = None if give_up else time.time() + delay
                await asyncio.to_thread(self.outbox.failed, upload, error, retry_at)
                OUTPUT_UPLOADS.labels("dead" if give_up else "retried").inc()
                self.on_outcome(upload, "dead" if give_up else "retried", error)
                later = "given up: its files stay on disk" if retry_at is None else f"tried again in {delay:.0f} s"
                log.warning("the outputs of job %s could not be stored in %s: %s; %s", upload.job_id,
                            self.bucket.location, error, later)  # fmt: skip
                if give_up:
                    await asyncio.to_thread(self.on_stored, upload.job_id)  # its webhooks go, without the objects
                return
            if keys is None:
                return  # the lease ran out meanwhile: the node that took the job records it
            OUTPUT_UPLOADS.labels("stored").inc()
            OUTPUT_UPLOAD_SECONDS.observe(max(0.0, time.time() - upload.created))
            self.on_outcome(upload, "stored", keys)
            await asyncio.to_thread(self.on_stored, upload.job_id)
            self.wake()
        except Exception:  # recording the outcome failed: the lease brings the job back later
            log.exception("the upload of job %s: its outcome could not be recorded", upload.job_id)

    def store(self, upload: Upload) -> list[str] | None:
        """Put each of the job's files in the bucket, then record them (in a worker thread): the keys, or None
        when the lease ran out meanwhile; raises when a file could not be stored."""
        objects: list[StoredObject] = []
        uploaded: list[tuple[str, os.stat_result]] = []
        found: list[tuple[OutputFile, str, str, os.stat_result]] = []
        for file in upload.files:  # every file looked at first: none is sent for a try that cannot end well
            key = self.bucket.key(upload.space, file.subfolder, file.filename)
            path = file_of(self.folders, upload.space, file.subfolder, file.filename)
            try:
                before = os.stat(path) if path is not None else None
            except FileNotFoundError:
                before = None
            if path is not None and before is not None:
                found.append((file, key, path, before))
            elif upload.attempts < MISSING_TRIES:  # a shared data dir's mount or cache a moment behind
                raise FileNotFoundError(f"{key} is not in the output folder (yet)")
            else:
                log.warning("job %s lists %s, which is not in its output folder: not stored", upload.job_id, key)
        for file, key, path, before in found:
            earlier = self.outbox.stored_as(upload.space, file)
            if (
                earlier is not None
                and earlier.key == key
                and (before.st_size == 0 or (before.st_size, before.st_mtime_ns) == (earlier.size, earlier.mtime_ns))
            ):  # the file an earlier job stored (emptied since, or unchanged): listed again from the cache
                objects.append(replace(earlier, job_id=upload.job_id))
                continue
            size = self.bucket.size(key) if before.st_size == 0 else None
            if size is None:  # an empty file may be one whose bytes are in the bucket already: never emptied there
                self.bucket.put(path, key, upload.job_id, before)
                uploaded.append((path, before))
            stored_size = before.st_size if size is None else size
            objects.append(StoredObject(upload.job_id, upload.space, file.subfolder, file.filename, key,
                                        stored_size, before.st_mtime_ns))  # fmt: skip
        if not self.outbox.stored(upload, objects):
            return None
        if not self.bucket.settings.keep_local:
            for path, before in uploaded:
                with contextlib.suppress(OSError):
                    emptied(path, before)
        return [found.key for found in objects]
