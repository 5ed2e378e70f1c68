"""The uploads contract (`storage/uploads.Uploads`), run against both: the SQLite queue's file (its trigger
writes the outbox) and a cluster's Redis (the queue's finish script does). A succeeded job's upload, its
lease, its record of objects, and the `job.succeeded` webhook that waits for it."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.redis_server import RedisServer
from zimage_serve.identity import USER, JobContext
from zimage_serve.queue.contract import JobQueue
from zimage_serve.queue.jobs import Job, NewJob
from zimage_serve.queue.redis_queue import RedisQueue
from zimage_serve.queue.sqlite_queue import SQLiteQueue
from zimage_serve.storage.redis_uploads import RedisUploadOutbox
from zimage_serve.storage.uploads import OutputFile, StoredObject, UploadOutbox, Uploads
from zimage_serve.webhooks.redis_store import RedisWebhookStore
from zimage_serve.webhooks.store import Webhooks, WebhookStore

Opened = tuple[JobQueue, Uploads, Webhooks]


def sqlite_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Opened:
    path = tmp_path / "queue.sqlite3"
    return SQLiteQueue(path), UploadOutbox(path), WebhookStore(path)


def redis_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Opened:
    server: RedisServer = request.getfixturevalue("redis_server")
    queue = RedisQueue(server.url, prefix=f"test-{uuid.uuid4().hex[:12]}:")
    uploads = RedisUploadOutbox(queue.redis, queue.prefix, queue.call)
    return queue, uploads, RedisWebhookStore(queue.redis, queue.prefix, queue.call)


BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], Opened]] = {
    "sqlite": sqlite_backend,
    "redis": redis_backend,
}
RESULT = {
    "outputs": {
        "9": {
            "images": [
                {"filename": "a_00001_.png", "subfolder": "x", "type": "output"},
                {"filename": "t_00001_.png", "subfolder": "", "type": "temp"},
            ]
        }
    }
}


@pytest.fixture(params=sorted(BACKENDS))
def opened(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opened]:
    queue, uploads, hooks = BACKENDS[request.param](request, tmp_path)
    yield queue, uploads, hooks
    hooks.close()
    uploads.close()
    queue.close()


def run(queue: JobQueue, job_id: str, owner: str = "alice", state: str = "success") -> None:
    job = Job(job_id, 1.0, {"1": {}}, {}, ["1"], owner=owner, context=JobContext(role=USER))
    queue.enqueue_many([NewJob.of(job)])
    claimed = queue.claim("w")
    assert claimed is not None and claimed.id == job_id
    queue.finish(job_id, state, RESULT)
    queue.finish(job_id, state, RESULT)  # again (a stale worker): nothing more


def test_a_succeeded_job_is_uploaded_once_a_store_is_in_use_and_its_webhook_waits(opened: Opened) -> None:
    queue, uploads, hooks = opened
    hooks.add("shop", "https://shop.example", ["succeeded"], subscribe=True)
    run(queue, "before")  # no store in use yet: nothing to upload
    assert uploads.pending() == []
    uploads.use("s3://bucket/prefix")
    run(queue, "failed", state="error")  # only succeeded jobs have files to store
    run(queue, "job")
    [pending] = uploads.pending()
    assert pending["job_id"] == "job" and pending["dead"] is None

    later = time.time() + 5
    sent = [d.job_id for d in hooks.claim(later, 100, 60)]
    assert "before" in sent and "job" not in sent  # its event waits for its files
    [upload] = uploads.claim(later, 10, 60)
    assert (upload.job_id, upload.space, upload.files) == ("job", "alice", (OutputFile("x", "a_00001_.png"),))
    assert upload.attempts == 1 and uploads.claim(later, 10, 60) == []  # leased

    stored = StoredObject("job", "alice", "x", "a_00001_.png", "prefix/users/alice/x/a_00001_.png", 123)
    stale = type(upload)(**{**upload.__dict__, "lease_until": upload.lease_until - 1})
    assert not uploads.stored(stale, [stored])  # another claim's: records nothing
    assert uploads.stored(upload, [stored])
    assert uploads.pending() == [] and uploads.objects_of(["job", "before"]) == {"job": [stored]}
    assert uploads.stored_as("alice", OutputFile("x", "a_00001_.png")) == stored
    assert uploads.stored_as("bob", OutputFile("x", "a_00001_.png")) is None
    hooks.release("job", later)  # what the uploader says once it recorded the files
    [event] = [d for d in hooks.claim(later, 100, 60) if d.job_id == "job"]  # now it goes
    assert event.event == "succeeded"

    assert queue.delete_history(["job"]) == 1  # the job leaves the history: its record goes with it
    assert uploads.objects_of(["job"]) == {} and uploads.stored_as("alice", OutputFile("x", "a_00001_.png")) is None

    run(queue, "gone")  # deleted while its upload was under way: its upload ends, and records nothing
    [late] = uploads.claim(later + 200, 10, 60)
    assert queue.delete_history(["gone"]) == 1
    assert uploads.stored(late, [StoredObject("gone", "alice", "x", "a_00001_.png", "k", 1)])
    assert uploads.objects_of(["gone"]) == {} and uploads.pending() == []


def test_an_upload_that_fails_is_tried_again_then_given_up_on_and_the_webhook_goes(opened: Opened) -> None:
    queue, uploads, hooks = opened
    hooks.add("shop", "https://shop.example", ["succeeded"], subscribe=True)
    uploads.use("s3://bucket/prefix")
    run(queue, "job", owner="")
    now = time.time() + 5
    [upload] = uploads.claim(now, 10, 60)
    assert upload.space == ""  # the local operator's files are the shared folders'
    uploads.failed(upload, "EndpointConnectionError: the store is away", now + 30)
    assert uploads.claim(now + 10, 10, 60) == []
    [again] = uploads.claim(now + 31, 10, 60)
    assert again.attempts == 2
    assert [d.job_id for d in hooks.claim(now + 31, 100, 60)] == []  # still waiting for the files
    uploads.failed(again, "AccessDenied", None)
    [dead] = uploads.pending()
    assert dead["dead"] is not None and dead["error"] == "AccessDenied"
    assert uploads.forget_dead(dead["dead"] - 1) == 0 and len(uploads.pending()) == 1
    assert uploads.claim(now + 3600, 10, 60) == []
    hooks.release("job", now + 31)
    assert [d.job_id for d in hooks.claim(now + 31, 100, 60)] == ["job"]  # given up on: it goes, without
    assert uploads.forget_dead(time.time() + 1) == 1 and uploads.pending() == []


def test_a_sqlite_server_started_without_a_store_gives_up_what_waits(tmp_path: Path) -> None:
    """One machine: its uploads wait for no one else. (A cluster's wait for any node still uploading; the
    mark that says one does expires two minutes after the last.)"""
    path = tmp_path / "queue.sqlite3"
    queue, uploads = SQLiteQueue(path), UploadOutbox(path)
    uploads.use("s3://bucket/prefix")
    run(queue, "job")
    uploads.use(None)
    [given_up] = uploads.pending()
    assert given_up["dead"] is not None and "no output store" in given_up["error"]
    uploads.close()
    queue.close()


def test_uploads_given_up_on_are_listed_and_tried_again(opened: Opened) -> None:
    queue, uploads, _ = opened
    uploads.use("s3://bucket/prefix")
    for job in ("a", "b"):
        run(queue, job)
    now = time.time() + 5
    for upload in uploads.claim(now, 10, 60):
        uploads.failed(upload, "NoSuchBucket", None)
    assert [(row["job_id"], row["dead"] is not None) for row in uploads.pending()] == [("a", True), ("b", True)]
    assert uploads.retry([], now) == 0 and uploads.retry(["b"], now + 1) == 1
    [again] = uploads.claim(now + 2, 10, 60)
    assert again.job_id == "b" and again.attempts == 1 and again.created == pytest.approx(now + 1)
    assert uploads.retry(None, now + 3) == 1  # every one given up on: a
    assert sorted(u.job_id for u in uploads.claim(now + 4, 10, 60)) == ["a"]


def test_held_events_take_no_room_from_the_endpoints_other_events(opened: Opened) -> None:
    """Many job.succeeded events waiting for their files (a store away for a while): a new event of the same
    endpoint still goes at once, and the held ones go the moment their files are stored."""
    queue, uploads, hooks = opened
    hooks.add("shop", "https://shop.example", ["succeeded", "failed"], subscribe=True)
    uploads.use("s3://bucket/prefix")
    for n in range(12):
        run(queue, f"held{n}")
    run(queue, "broken", state="error")  # its job.failed comes after twelve held events
    now = time.time() + 5
    assert [d.job_id for d in hooks.claim(now, 16, 60, 2)] == ["broken"]
    [upload] = [u for u in uploads.claim(now, 16, 60) if u.job_id == "held3"]
    assert uploads.stored(upload, [])
    hooks.release("held3", now + 1)
    assert [d.job_id for d in hooks.claim(now + 1, 16, 60, 2, {})] == ["held3"]
