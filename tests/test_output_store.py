"""Outputs in an S3-compatible store: uploaded from the queue's outbox after each job, under the owner's prefix,
named by history, /api/jobs, Comfy API v2 and webhooks; the store away and back again loses nothing and
stores nothing twice. The store is moto's S3 server, on a loopback port, reached over HTTP as any would be."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.redis_server import RedisServer
from tests.support.jobs import wait_until
from tests.support.metrics import samples, value
from tests.support.s3 import BUCKET, S3, running_s3
from tests.support.threaded import threaded_server
from tests.test_webhooks import graph, policy, receiving
from zimage_serve.security.audit_verify import records
from zimage_serve.storage.bucket import Bucket, OutputStoreSettings, StoreLocationError, parse_location
from zimage_serve.storage.uploads import OutputFile, UploadOutbox, output_files
from zimage_serve.webhooks.store import WebhookStore


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3]:
    with running_s3(monkeypatch) as store:
        yield store


def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    for folder in (data / "input", data / "input" / "users" / "alice"):
        folder.mkdir(parents=True)
        Image.new("RGB", (8, 8), "red").save(folder / "red.png")
    return data


def outputs(**changes: Any) -> OutputStoreSettings:
    return replace(
        OutputStoreSettings(f"s3://{BUCKET}/renders"), first_delay_s=0.05, max_delay_s=0.2, poll_s=0.02, **changes
    )


def stored_count(server: Any) -> float:
    found = samples(server.request("GET", "/metrics")[2].decode())
    return value(found, "zimage_output_uploads_total", outcome="stored")


def files_of(entry: dict[str, Any]) -> list[dict[str, Any]]:
    return [item for ui in entry["outputs"].values() for item in ui.get("images", [])]


def test_each_output_goes_to_the_users_prefix_and_every_view_of_the_job_names_it(tmp_path: Path, s3: S3) -> None:
    from tests.support.tokens import make_tokens

    data = data_dir(tmp_path)
    tokens = make_tokens(data)
    hooks = WebhookStore(data / "queue.sqlite3")
    with receiving() as receiver:
        hooks.add("shop", receiver.url, ["succeeded"], subscribe=True)
        store = outputs(keep_local=False)
        with threaded_server(data, auth="on", webhooks=policy(), outputs=store, preload=False) as server:
            admin, alice = server.as_token(tokens["admin"]), server.as_token(tokens["user"])
            stored_before = stored_count(admin)
            status, answer = alice.json("POST", "/prompt", {"prompt": graph("sku-42")})
            assert status == 200, answer
            job = answer["prompt_id"]
            wait_until(lambda: len(receiver.bodies("job.succeeded")) == 1, timeout=30)
            key = "renders/users/alice/sku-42_00001_.png"
            assert s3.keys() == [key]
            png = s3.body(key)
            assert png.startswith(b"\x89PNG")

            [image] = receiver.bodies("job.succeeded")[0]["data"]["images"]
            assert image["url"].startswith(f"{s3.url}/{BUCKET}/{key}?") and "X-Amz-Signature=" in image["url"]
            assert image["object"] == f"s3://{BUCKET}/{key}"
            assert httpx.get(image["url"]).content == png  # a presigned URL: no credentials needed

            [listed] = files_of(alice.json("GET", f"/history/{job}")[1][job])
            assert listed["filename"] == "sku-42_00001_.png" and listed["url"].startswith(f"{s3.url}/{BUCKET}/{key}?")
            assert listed["url_expires_at"] > 0
            [listed] = files_of(alice.json("GET", "/history")[1][job])
            assert "url" in listed
            found = alice.json("GET", f"/api/jobs/{job}")[1]
            assert found["preview_output"]["url"].startswith(s3.url) and "url" in files_of(found)[0]
            assert alice.json("GET", "/api/jobs")[1]["jobs"][0]["preview_output"]["url"].startswith(s3.url)
            [seen] = [j for j in admin.json("GET", "/api/jobs")[1]["jobs"] if j["id"] == job]  # under users/alice
            assert seen["preview_output"]["subfolder"] == "users/alice"
            assert seen["preview_output"]["url"].startswith(f"{s3.url}/{BUCKET}/{key}?")
            assert admin.json("GET", f"/api/jobs/{job}")[1]["preview_output"]["url"].startswith(
                f"{s3.url}/{BUCKET}/{key}?"
            )
            [output] = alice.json("GET", f"/api/v2/jobs/{job}")[1]["outputs"]
            assert output["url"].startswith(f"{s3.url}/{BUCKET}/{key}?") and output["size_bytes"] == len(png)

            # --no-keep-local: the bytes left the disk, the name stays (no later image takes it) ...
            local = data / "output" / "users" / "alice" / "sku-42_00001_.png"
            assert local.stat().st_size == 0
            # ... and every way of reading the file reads the object.
            view = "/view?filename=sku-42_00001_.png&type=output"
            assert alice.request("GET", view)[2] == png
            assert admin.request("GET", view + "&subfolder=users/alice")[2] == png
            assets = alice.json("GET", f"/api/v2/jobs/{job}")[1]["outputs"][0]["id"]
            assert alice.request("GET", f"/api/v2/assets/{assets}/content")[2] == png
            s3.server.stop()  # the store away: a clear 503 to try again, never a 500
            status, _, body = alice.request("GET", view)
            assert status == 503 and b"output store" in body
            assert alice.request("GET", f"/api/v2/assets/{assets}/content")[0] == 503
            s3.server.start()

            # The same graph again is served from the cache: it lists the first job's file, which is not stored
            # again; the admin's files go under the prefix itself.
            second = alice.json("POST", "/prompt", {"prompt": graph("sku-42")})[1]["prompt_id"]
            shared = admin.json("POST", "/prompt", {"prompt": graph("banner")})[1]["prompt_id"]
            wait_until(lambda: len(receiver.bodies("job.succeeded")) == 3, timeout=30)
            [again] = files_of(alice.json("GET", f"/history/{second}")[1][second])
            assert again["filename"] == "sku-42_00001_.png" and again["url"].startswith(f"{s3.url}/{BUCKET}/{key}?")
            [banner] = files_of(admin.json("GET", f"/history/{shared}")[1][shared])
            assert banner["url"].startswith(f"{s3.url}/{BUCKET}/renders/banner_00001_.png?")
            assert s3.keys() == ["renders/banner_00001_.png", key]
            assert stored_count(admin) - stored_before == 3  # the three jobs (counters are this process's)
    hooks.close()
    found = list(records(data / "audit"))  # the server has stopped: its log is written
    [first] = [r for r in found if r["kind"] == "output_store" and r["job_id"] == job]
    assert first["outcome"] == "stored" and first["user"] == "alice" and first["files"] == [key]
    sent = [r for r in found if r["kind"] == "webhook" and r["job_id"] == job]
    assert [(r["event"], r["outcome"], r["endpoint"]) for r in sent] == [("succeeded", "delivered", "shop")]


def test_the_store_away_then_back_loses_nothing_stores_nothing_twice_and_holds_the_webhook(
    tmp_path: Path, s3: S3
) -> None:
    data = data_dir(tmp_path)
    hooks = WebhookStore(data / "queue.sqlite3")
    with receiving() as receiver:
        hooks.add("shop", receiver.url, ["succeeded"], subscribe=True)
        s3.server.stop()  # away before the jobs end
        with threaded_server(data, webhooks=policy(), outputs=outputs(), preload=False) as server:
            jobs = [server.json("POST", "/prompt", {"prompt": graph(f"p{n}")})[1]["prompt_id"] for n in range(3)]
            uploads = UploadOutbox(data / "queue.sqlite3")
            wait_until(lambda: len(server.json("GET", "/history")[1]) == 3, timeout=30)
            wait_until(lambda: all(row["attempts"] >= 2 for row in uploads.pending()), timeout=30)
            assert len(uploads.pending()) == 3 and all(row["error"] for row in uploads.pending())
            assert receiver.bodies("job.succeeded") == []  # held: the receiver could not fetch the objects yet
            for job in jobs:
                assert "url" not in files_of(server.json("GET", f"/history/{job}")[1][job])[0]

            s3.server.start()
            wait_until(lambda: len(receiver.bodies("job.succeeded")) == 3, timeout=30)
            assert uploads.pending() == []
            uploads.close()
            assert s3.keys() == [f"renders/p{n}_00001_.png" for n in range(3)]
            for body in receiver.bodies("job.succeeded"):
                [image] = body["data"]["images"]
                assert image["url"].startswith(f"{s3.url}/{BUCKET}/renders/")
            for n in range(3):  # --keep-local (the default): the files stay, equal to their objects
                local = data / "output" / f"p{n}_00001_.png"
                assert local.read_bytes() == s3.body(f"renders/p{n}_00001_.png")
    hooks.close()
    tries = [r for r in records(data / "audit") if r["kind"] == "output_store" and r["job_id"] == jobs[0]]
    assert [r["outcome"] for r in tries] == ["retried", "stored"]  # the first failure, then the end
    assert "error" in tries[0]["error"].lower() and tries[1]["files"] == ["renders/p0_00001_.png"]


def test_the_files_of_a_history_entry_are_read_from_whatever_it_holds() -> None:
    hostile: list[Any] = [
        None,
        "text",
        {"outputs": "x"},
        {"outputs": {"1": "x", "2": {"images": "x"}, "3": {"images": [1, "x", {"filename": 3}]}}},
    ]
    assert all(list(output_files(result)) == [] for result in hostile)
    entry = {
        "outputs": {
            "1": {"images": [{"filename": "a.png", "type": "output"}, {"filename": "t.png", "type": "temp"}]},
            "2": {"gifs": [{"filename": "b.webp", "subfolder": "s"}], "text": ["hello"]},
        }
    }
    assert list(output_files(json.loads(json.dumps(entry)))) == [OutputFile("", "a.png"), OutputFile("s", "b.webp")]


@pytest.mark.parametrize(
    ("location", "problem"),
    [
        ("bucket/prefix", "s3://BUCKET"),
        ("s3://", "bucket name"),
        ("s3://Upper", "bucket name"),
        ("s3://ok-bucket/../up", "plain path parts"),
        ("gs://ok-bucket", "s3://BUCKET"),
    ],
)
def test_a_store_location_that_is_not_one_is_refused_naming_the_option(location: str, problem: str) -> None:
    with pytest.raises(StoreLocationError, match="--output-store") as refused:
        parse_location(location)
    assert problem in str(refused.value)


def test_keys_mirror_the_output_folder_below_the_prefix() -> None:
    assert parse_location("s3://shop-images//renders/2026/") == ("shop-images", "renders/2026")
    bucket = Bucket(OutputStoreSettings("s3://shop-images/renders", public_url="https://cdn.example/img"))
    assert bucket.key("", "", "a.png") == "renders/a.png"
    assert bucket.key("alice", "sku/7", "a b.png") == "renders/users/alice/sku/7/a b.png"
    assert bucket.url("renders/a b.png") == ("https://cdn.example/img/renders/a%20b.png", None)
    with pytest.raises(StoreLocationError, match="--output-url-lifetime"):
        OutputStoreSettings("s3://shop-images", url_lifetime_s=8 * 86400)


def test_a_large_output_goes_up_in_parts_and_a_small_one_in_one_request(tmp_path: Path, s3: S3) -> None:
    import os

    bucket = Bucket(OutputStoreSettings(f"s3://{BUCKET}/renders"))
    large, small = tmp_path / "clip.webm", tmp_path / "a.png"
    large.write_bytes(os.urandom(9 * 1024 * 1024))
    small.write_bytes(b"\x89PNG small")
    for path in (large, small):
        bucket.put(str(path), f"renders/{path.name}", "job-1", path.stat())
        assert s3.body(f"renders/{path.name}") == path.read_bytes()
    head = s3.client().head_object(Bucket=BUCKET, Key="renders/clip.webm")
    assert head["ETag"].strip('"').endswith("-2") and head["Metadata"] == {"job-id": "job-1"}  # two parts
    assert s3.client().head_object(Bucket=BUCKET, Key="renders/a.png")["ContentType"] == "image/png"
    assert bucket.size("renders/a.png") == len(b"\x89PNG small") and bucket.size("renders/none") is None
    assert bucket.get("renders/none") is None


def test_on_a_cluster_queue_a_remote_workers_output_is_stored_and_its_webhook_names_it(
    tmp_path: Path, s3: S3, redis_server: RedisServer
) -> None:
    """An API node on Redis (no worker of its own); the test is the worker on another machine, writing the
    output in the shared data dir and recording the job's end in Redis: the node uploads it, and the job's
    `succeeded` webhook, held until then, names the object."""
    import uuid

    from tests.support.app import serving
    from zimage_serve.queue.redis_queue import RedisQueue

    data, prefix = data_dir(tmp_path), f"o{uuid.uuid4().hex[:10]}:"
    url = f"{redis_server.url}?prefix={prefix}"
    with (
        receiving() as receiver,
        serving(data, queue=url, workers=0, preload=False, webhooks=policy(), outputs=outputs()) as server,
    ):
        hook = {"name": "shop", "url": receiver.url, "events": ["succeeded"]}
        assert server.json("POST", "/api/zimage/webhooks", hook)[0] == 201
        status, answer = server.json("POST", "/prompt", {"prompt": graph("remote"), "extra_data": {"webhook": "shop"}})
        assert status == 200, answer
        job = answer["prompt_id"]
        worker = RedisQueue(redis_server.url, prefix=prefix)
        claimed = worker.claim("elsewhere")
        assert claimed is not None and claimed.id == job
        (data / "output" / "remote_00001_.png").write_bytes(b"\x89PNG from another machine")
        image = {"filename": "remote_00001_.png", "subfolder": "", "type": "output"}
        worker.finish(job, "success", {"outputs": {"2": {"images": [image]}}, "messages": []})
        wait_until(lambda: receiver.bodies("job.succeeded"), timeout=30)
        [sent] = receiver.bodies("job.succeeded")[0]["data"]["images"]
        assert sent["object"] == f"s3://{BUCKET}/renders/remote_00001_.png"
        assert httpx.get(sent["url"]).content == b"\x89PNG from another machine"
        [listed] = files_of(server.json("GET", f"/history/{job}")[1][job])
        assert listed["url"].startswith(f"{s3.url}/{BUCKET}/renders/remote_00001_.png?")
        worker.close()


def test_a_file_is_uploaded_only_as_it_was_looked_at_and_a_reused_name_is_uploaded_again(
    tmp_path: Path, s3: S3
) -> None:
    """The bytes that go up are the file's that was looked at (not an empty file put in its place by another
    upload meanwhile); a file an earlier job stored is not sent again, unless a new file took its name."""
    import os

    from zimage_serve.queue.jobs import Job, NewJob
    from zimage_serve.queue.sqlite_queue import SQLiteQueue
    from zimage_serve.storage.bucket import FileChanged
    from zimage_serve.storage.uploader import Uploader
    from zimage_serve.storage.uploads import Upload
    from zimage_serve.workflow.folders import Folders

    data = data_dir(tmp_path)
    folders = Folders.default(data)
    (data / "output").mkdir()
    image = data / "output" / "x_00001_.png"
    image.write_bytes(b"first image")
    bucket = Bucket(outputs(keep_local=False))
    looked = os.stat(image)
    image.with_name("empty").touch()
    os.replace(image.with_name("empty"), image)  # what a finished upload does to a stored file
    with pytest.raises(FileChanged):
        bucket.put(str(image), "renders/x_00001_.png", "job", looked)
    assert s3.keys() == []

    image.write_bytes(b"first image")
    queue = SQLiteQueue(data / "queue.sqlite3")
    outbox = UploadOutbox(data / "queue.sqlite3")
    outbox.use(bucket.location)
    uploader = Uploader(outbox, bucket, folders)
    puts: list[str] = []
    put = bucket.put
    bucket.put = lambda path, key, job, expected: puts.append(key) or put(path, key, job, expected)  # type: ignore[method-assign]

    def upload(job: str) -> None:
        queue.enqueue_many([NewJob.of(Job(job, 1.0, {"1": {}}, {}, ["1"]))])
        assert queue.claim() is not None
        queue.finish(job, "success", {"outputs": {"1": {"images": [{"filename": image.name, "type": "output"}]}}})
        [claimed] = outbox.claim(time.time() + 1, 10, 60)
        assert isinstance(claimed, Upload) and uploader.store(claimed) == ["renders/x_00001_.png"]

    upload("one")
    assert image.stat().st_size == 0 and s3.body("renders/x_00001_.png") == b"first image"  # --no-keep-local
    upload("two")  # the same file listed again (from the cache): not sent again
    image.unlink()
    image.write_bytes(b"another image")  # the name given out again (after a restart, say)
    upload("three")
    assert puts == ["renders/x_00001_.png", "renders/x_00001_.png"] and s3.body(puts[0]) == b"another image"
    assert queue.delete_history(["three"]) == 1 and outbox.objects_of(["three"]) == {}
    outbox.close()
    queue.close()


def test_the_command_line_lists_uploads_given_up_on_and_tries_them_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.support.cli import run
    from zimage_serve.queue.jobs import Job, NewJob
    from zimage_serve.queue.sqlite_queue import SQLiteQueue

    data = data_dir(tmp_path)
    queue = SQLiteQueue(data / "queue.sqlite3")
    uploads = UploadOutbox(data / "queue.sqlite3")
    uploads.use(f"s3://{BUCKET}/renders")
    queue.enqueue_many([NewJob.of(Job("job-1", 1.0, {"1": {}}, {}, ["1"]))])
    assert queue.claim() is not None
    queue.finish("job-1", "success", {"outputs": {}})
    [upload] = uploads.claim(time.time() + 1, 10, 60)
    uploads.failed(upload, "NoSuchBucket: the bucket does not exist", None)
    code, out, _ = run(["outputs", "pending", "--data-dir", str(data)], capsys)
    [row] = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and row["job_id"] == "job-1" and row["dead"] and "NoSuchBucket" in row["error"]
    code, _, err = run(["outputs", "retry", "job-1", "--data-dir", str(data)], capsys)
    assert code == 0 and "1 uploads back in the outbox" in err
    assert [u.job_id for u in uploads.claim(time.time() + 2, 10, 60)] == ["job-1"]
    code, _, err = run(["outputs", "pending", "--queue", "ftp://x", "--data-dir", str(data)], capsys)
    assert code == 2 and "--queue" in err
    uploads.close()
    queue.close()
