"""Webhooks: endpoints, the outbox the queue's triggers fill, signed deliveries (verified with the Standard
Webhooks library a receiver would use), retries, dead letters and replay, and the addresses refused."""

from __future__ import annotations

import ipaddress
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from standardwebhooks import Webhook

from tests.support.cli import run
from tests.support.jobs import wait_until
from tests.support.threaded import threaded_server
from zimage_serve.webhooks.delivery import DeliveryPolicy, forbidden, retry_delay
from zimage_serve.webhooks.store import WebhookError, WebhookStore

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


@dataclass
class Receiver:
    """An HTTP endpoint on loopback that records what it is sent, answering as `answers` says."""

    port: int = 0
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)  # statuses to answer, in turn; then 200

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def bodies(self, event: str | None = None) -> list[dict[str, Any]]:
        found = [json.loads(body) for _, body in self.received]
        return [b for b in found if event is None or b["type"] == event]


@contextmanager
def receiving(answers: list[int] | None = None) -> Iterator[Receiver]:
    receiver = Receiver(answers=list(answers or []))

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
            status = receiver.answers.pop(0) if receiver.answers else 200
            self.send_response(status)
            if status in (301, 302, 307):
                self.send_header("Location", "http://127.0.0.1:9/elsewhere")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()


def graph(prefix: str) -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "red.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    (data / "input").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(data / "input" / "red.png")
    return data


def policy(**changes: Any) -> DeliveryPolicy:
    return DeliveryPolicy(**{"allowed": LOOPBACK, "first_delay_s": 0.05, "poll_s": 0.02, **changes})


def test_a_named_job_sends_its_events_signed_and_each_once(tmp_path: Path) -> None:
    data = data_dir(tmp_path)
    store = WebhookStore(data / "queue.sqlite3")
    with receiving() as receiver:
        endpoint, secret = store.add("shop", receiver.url)
        assert secret.startswith("whsec_") and secret not in json.dumps(endpoint.public())
        security = {"public_url": "https://images.example"}
        with threaded_server(data, security=security, webhooks=policy(), preload=False) as server:
            status, answer = server.json(
                "POST", "/prompt", {"prompt": graph("named"), "extra_data": {"webhook": "shop"}}
            )
            assert status == 200, answer
            job = answer["prompt_id"]
            wait_until(lambda: len(receiver.bodies("job.succeeded")) == 1, timeout=30)
            anonymous = server.json("POST", "/prompt", {"prompt": graph("anonymous")})[1]["prompt_id"]
            status, refused = server.json("POST", "/prompt", {"prompt": graph("x"), "extra_data": {"webhook": "nope"}})
            assert status == 400 and refused["error"]["type"] == "invalid_webhook", refused
            assert "extra_data.webhook" in refused["error"]["details"]
            wait_until(lambda: len(server.json("GET", "/history")[1]) == 2)
            assert store.waiting() == 0  # the job that names no endpoint put nothing in the outbox
    store.close()
    assert anonymous not in {body["data"]["job_id"] for body in receiver.bodies()}
    types = sorted(body["type"] for body in receiver.bodies())  # queued and started may cross on the wire
    assert types == ["job.queued", "job.started", "job.succeeded"], types
    assert receiver.bodies()[-1]["type"] == "job.succeeded" or len(receiver.received) == 3
    for headers, body in receiver.received:  # what a receiver checks, with the convention's own library
        event = Webhook(secret).verify(body, headers)
        assert event["data"]["job_id"] == job
    assert len({headers["webhook-id"] for headers, _ in receiver.received}) == 3
    done = receiver.bodies("job.succeeded")[0]["data"]
    [image] = done["images"]
    assert image["filename"] == "named_00001_.png" and image["url"].startswith("https://images.example/view?filename=")
    assert done["status"] == "success" and done["outputs"]["2"]["images"][0] == {
        k: image[k] for k in done["outputs"]["2"]["images"][0]
    }


def test_a_failing_endpoint_is_tried_again_with_the_same_id_then_given_up_and_replayed(tmp_path: Path) -> None:
    data = data_dir(tmp_path)
    store = WebhookStore(data / "queue.sqlite3")
    with receiving(answers=[500, 302]) as receiver:
        _, secret = store.add("ops", receiver.url, ["succeeded"], subscribe=True)
        with threaded_server(data, webhooks=policy(), preload=False) as server:
            server.json("POST", "/prompt", {"prompt": graph("retried")})  # subscribed: no name needed
            wait_until(lambda: len(receiver.received) == 3, timeout=30)  # 500, then a redirect not followed, then 200
        assert len({headers["webhook-id"] for headers, _ in receiver.received}) == 1
        assert all(Webhook(secret).verify(body, headers) for headers, body in receiver.received)
        assert store.waiting() == 0 and store.dead_letters() == []

    # An endpoint that never answers well: tried until the retry window closes, then a dead letter.
    with receiving(answers=[503] * 1000) as receiver:
        store.remove("ops")
        store.add("flaky", receiver.url, ["succeeded"], subscribe=True)
        with threaded_server(data, webhooks=policy(retry_for_s=0.5), preload=False) as server:
            server.json("POST", "/prompt", {"prompt": graph("dead")})
            wait_until(lambda: len(store.dead_letters()) == 1, timeout=30)
            [letter] = store.dead_letters()
            assert letter["endpoint"] == "flaky" and letter["error"] == "answered 503" and letter["attempts"] >= 2
            receiver.answers.clear()
            tried = len(receiver.received)
            assert store.replay() == 1
            wait_until(lambda: len(receiver.received) == tried + 1 and store.waiting() == 0, timeout=30)
            assert store.dead_letters() == []
    store.close()


def test_addresses_deliveries_may_not_reach_are_refused(tmp_path: Path) -> None:
    allowed = (ipaddress.ip_network("10.1.0.0/16"),)
    for text in ("127.0.0.1", "10.0.0.5", "192.168.1.1", "169.254.169.254", "::1", "::ffff:127.0.0.1", "fe80::1",
                 "0.0.0.0", "224.0.0.1", "fc00::1"):  # fmt: skip
        assert forbidden(ipaddress.ip_address(text), allowed), text
    for text in ("100.100.100.200", "100.64.0.1", "fec0::1", "2002:7f00:1::", "2001:0:4136:e378:8000:63bf:80ff:fffe"):
        assert forbidden(ipaddress.ip_address(text), allowed), text  # shared space, site-local, 6to4, Teredo
    assert not forbidden(ipaddress.ip_address("10.1.2.3"), allowed)  # the admin allowed this network
    assert not forbidden(ipaddress.ip_address("93.184.216.34"), ())

    data = data_dir(tmp_path)
    store = WebhookStore(data / "queue.sqlite3")
    with receiving() as receiver:  # by a name that resolves to loopback, as a rebinding trick would
        store.add("local", receiver.url.replace("127.0.0.1", "localhost"), ["succeeded"], subscribe=True)
        with threaded_server(data, webhooks=policy(allowed=(), retry_for_s=0.3), preload=False) as server:
            server.json("POST", "/prompt", {"prompt": graph("refused")})
            wait_until(lambda: len(store.dead_letters()) == 1, timeout=30)
        assert receiver.received == []  # never connected to
    assert "localhost resolves to" in store.dead_letters()[0]["error"]
    assert "which deliveries may not reach" in store.dead_letters()[0]["error"]
    store.close()


def test_backoff_grows_with_jitter_up_to_its_cap() -> None:
    slow = DeliveryPolicy(first_delay_s=2, max_delay_s=60)
    assert [retry_delay(n, slow, lambda: 1.0) for n in (1, 2, 3, 4, 10)] == [2, 4, 8, 16, 60]
    assert retry_delay(3, slow, lambda: 0.0) == 1.0  # jitter, with a floor


@pytest.mark.parametrize(
    ("call", "why"),
    [
        (lambda s: s.add("bad name!", "https://x.example"), "name"),
        (lambda s: s.add("ok", "ftp://x.example"), "url"),
        (lambda s: s.add("ok", "https://user:pw@x.example"), "credentials"),
        (lambda s: s.add("ok", "https://x.example", ["sent"]), "events"),
        (lambda s: s.add("ok", "http://a.example:99999/"), "port"),
        (lambda s: s.add("ok", "https://x.example/a b"), "spaces"),
        (lambda s: s.add("ok", "https://x.example/\r\nX-Evil: 1"), "control"),
    ],
)
def test_an_endpoint_is_checked_before_it_is_kept(
    tmp_path: Path, call: Callable[[WebhookStore], Any], why: str
) -> None:
    store = WebhookStore(tmp_path / "queue.sqlite3")
    with pytest.raises(WebhookError, match=why):
        call(store)
    assert store.endpoints() == []
    store.add("twice", "https://x.example")
    with pytest.raises(WebhookError, match="exists already"):
        store.add("twice", "https://y.example")


def test_the_command_line_registers_lists_and_removes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data-dir", str(tmp_path)]
    code, stdout, stderr = run(["webhooks", "add", "https://erp.example/hook", "--name", "erp", "--events",
                                "succeeded,failed", *data], capsys)  # fmt: skip
    assert code == 0, stderr
    secret = stdout.strip().splitlines()[-1]
    assert secret.startswith("whsec_") and "shown only now" in stderr
    code, stdout, _ = run(["webhooks", "list", "--json", *data], capsys)
    [listed] = [json.loads(line) for line in stdout.splitlines()]
    assert listed["name"] == "erp" and listed["events"] == ["succeeded", "failed"] and secret not in stdout
    code, _, stderr = run(["webhooks", "add", "gopher://x", *data], capsys)
    assert code == 2 and "URL" in stderr
    code, _, stderr = run(["webhooks", "add", "https://x.example", "--user", "nobody", *data], capsys)
    assert code == 2 and "--user" in stderr
    assert run(["webhooks", "remove", "erp", *data], capsys)[0] == 0
    code, _, stderr = run(["webhooks", "remove", "erp", *data], capsys)
    assert code == 2 and "no endpoint" in stderr


def test_admins_manage_endpoints_over_http_and_users_name_them_through_v2_and_batch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.support.tokens import make_tokens

    data = data_dir(tmp_path)
    tokens = make_tokens(data)
    for user in ("alice", "bob"):
        (data / "input" / "users" / user).mkdir(parents=True)
        Image.new("RGB", (8, 8), "red").save(data / "input" / "users" / user / "red.png")
    from zimage_serve.security.tokens import TokenStore

    store = TokenStore(data / "auth.sqlite3")  # made before the server starts: it reads new tokens every few s
    nano = store.create("nano-user", "user")[0]
    store.close()
    with receiving() as receiver, threaded_server(data, auth="on", webhooks=policy(), preload=False) as server:
        admin, alice, bob = (server.as_token(tokens[k]) for k in ("admin", "user", "other"))
        assert alice.json("GET", "/api/zimage/webhooks")[0] == 403
        body = {"name": "alices", "url": receiver.url, "events": ["succeeded"], "user": "alice"}
        status, made = admin.json("POST", "/api/zimage/webhooks", body)
        assert (
            status == 201 and made["secret"].startswith("whsec_") and made["user"] and made["events"] == ["succeeded"]
        )
        assert admin.json("POST", "/api/zimage/webhooks", body)[0] == 409
        assert admin.json("POST", "/api/zimage/webhooks", {**body, "name": "x", "url": "file:///etc"})[0] == 400
        [listed] = admin.json("GET", "/api/zimage/webhooks")[1]["endpoints"]
        assert made["secret"] not in json.dumps(listed) and listed["name"] == "alices"

        v2 = {"workflow": graph("v2"), "metadata": {"webhook": "alices", "sku": "A1"}}
        status, job = alice.json("POST", "/api/v2/jobs", v2)
        assert status == 201, job
        status, refused = bob.json("POST", "/api/v2/jobs", v2)  # alice's endpoint: not bob's to name
        assert status == 422 and refused["error"]["code"] == "invalid_webhook", refused
        wait_until(lambda: len(receiver.bodies("job.succeeded")) == 1, timeout=30)
        event = Webhook(made["secret"]).verify(*reversed(receiver.received[0]))
        assert event["data"]["job_id"] == job["id"] and event["data"]["metadata"] == {"webhook": "alices", "sku": "A1"}

        rows = tmp_path / "rows.jsonl"
        rows.write_text('{"prompt": "a red circle", "seed": 1}\n{"prompt": "a blue square", "seed": 2}\n')
        hook = {"name": "batch", "url": receiver.url, "events": ["succeeded"], "user": "nano-user"}
        assert admin.json("POST", "/api/zimage/webhooks", hook)[0] == 201
        remote = ["--server", server.url, "--token", nano, "--webhook", "batch"]
        out = ["--set", "steps=2", "--out", str(tmp_path / "out")]
        code, _, stderr = run(["batch", str(rows), "--template", "zimage-nano", *remote, *out], capsys)
        assert code == 0, stderr
        wait_until(lambda: len(receiver.bodies("job.succeeded")) == 3, timeout=60)
        labels = sorted((b["data"]["metadata"] for b in receiver.bodies("job.succeeded")[1:]), key=lambda m: m["row"])
        assert [(m["row"], m["fields"]["prompt"]) for m in labels] == [(1, "a red circle"), (2, "a blue square")]
        assert admin.json("GET", "/api/zimage/webhooks/dead")[1] == {"dead": []}
        assert admin.json("POST", "/api/zimage/webhooks/replay", {})[1] == {"replayed": 0}
        metrics = admin.request("GET", "/metrics")[2].decode()
        assert 'zimage_webhook_deliveries_total{endpoint="alices",outcome="delivered"} 1.0' in metrics
        assert admin.request("DELETE", "/api/zimage/webhooks/alices")[0] == 200
        assert admin.request("DELETE", "/api/zimage/webhooks/alices")[0] == 404
    code, _, stderr = run(["batch", str(rows), "--template", "zimage-nano", "--webhook", "x"], capsys)
    assert code == 2 and "--webhook" in stderr and "--server" in stderr


def test_a_batch_pattern_a_failed_row_cannot_fill_fails_that_row_only(tmp_path: Path) -> None:
    from zimage_serve.batch.plan import plan_row
    from zimage_serve.batch.rows import Row
    from zimage_serve.templates.builtin import builtin

    template = builtin("zimage-nano")
    assert template is not None
    planned = plan_row(Row(3, error="not JSON"), template, [], "{row:04d}_{seed:08d}")
    assert planned.error == "not JSON" and planned.name == ""


def test_an_outbox_written_before_labels_gains_them_and_a_jobs_labels_are_kept_with_its_events(
    tmp_path: Path,
) -> None:
    import sqlite3

    from tests.support.queues import enqueue
    from zimage_serve.queue.sqlite_queue import SQLiteQueue
    from zimage_serve.webhooks.schema import TABLES

    path = tmp_path / "queue.sqlite3"
    older = TABLES.replace("dead REAL,", "dead REAL").split("    metadata TEXT")[0] + ");"
    with sqlite3.connect(path) as db:
        db.executescript(older)
    queue = SQLiteQueue(path)
    store = WebhookStore(path)
    store.add("all", "https://a.example", ["queued"], subscribe=True)
    enqueue(queue, "one", 1.0, {"1": {}}, {"metadata": {"sku": "A1"}}, ["1"])
    enqueue(queue, "two", 2.0, {"1": {}}, {"comfy_api_v2": {"metadata": "a label"}}, ["1"])
    enqueue(queue, "big", 3.0, {"1": {}}, {"metadata": {"x": "y" * 20_000}}, ["1"])  # too large: not sent
    enqueue(queue, "odd", 4.0, {"1": {}}, {"metadata": 7}, ["1"])
    rows = store._db.execute("SELECT job_id, metadata FROM webhook_outbox ORDER BY seq").fetchall()
    assert [tuple(r) for r in rows] == [("one", '{"sku":"A1"}'), ("two", '"a label"'), ("big", None), ("odd", "7")]
    queue.close()
    store.close()


def test_with_no_endpoint_a_submission_does_not_wake_the_dispatcher(tmp_path: Path) -> None:
    """The outbox is read at the poll, not once per job, while there is nothing it could hold."""
    import asyncio

    from zimage_serve.webhooks.delivery import Dispatcher

    store = WebhookStore(tmp_path / "queue.sqlite3")
    claims: list[float] = []
    claim = store.claim
    store.claim = lambda now, *args: claims.append(now) or claim(now, *args)  # type: ignore[method-assign]

    async def scenario() -> tuple[int, int]:
        dispatcher = Dispatcher(store, policy(poll_s=3600))
        running = asyncio.create_task(dispatcher.run())
        await asyncio.sleep(0)
        while store.has_endpoints:  # the first look, at the start, found none
            await asyncio.sleep(0.01)
        for _ in range(50):
            dispatcher.wake()
            await asyncio.sleep(0.001)
        idle = len(claims)
        store.add("shop", "https://shop.example/hook")
        dispatcher.wake()
        while len(claims) == idle:
            await asyncio.sleep(0.01)
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        return idle, len(claims)

    idle, woken = asyncio.run(scenario())
    store.close()
    assert idle == 1 and woken == 2


def test_an_endpoint_that_hangs_holds_its_own_deliveries_only(tmp_path: Path) -> None:
    """Tries to one endpoint are capped (`per_endpoint`): while a receiver that never answers holds its own,
    the other endpoints' deliveries go out."""
    import asyncio

    from tests.support.queues import enqueue
    from zimage_serve.queue.sqlite_queue import SQLiteQueue
    from zimage_serve.webhooks.delivery import Dispatcher

    hanging = threading.Event()
    release = threading.Event()

    class Stuck(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            hanging.set()
            release.wait(30)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    queue = SQLiteQueue(tmp_path / "queue.sqlite3")
    store = WebhookStore(tmp_path / "queue.sqlite3")
    with threaded_http(Stuck) as stuck_port, receiving() as receiver:
        store.add("stuck", f"http://127.0.0.1:{stuck_port}/hook", ["queued"], subscribe=True)
        store.add("fine", receiver.url, ["queued"], subscribe=True)
        for n in range(6):
            enqueue(queue, f"job{n}", float(n), {"1": {}}, {}, ["1"])

        async def scenario() -> None:
            dispatcher = Dispatcher(store, policy(concurrency=2, per_endpoint=1, timeout_s=30))
            running = asyncio.create_task(dispatcher.run())
            try:
                while len(receiver.received) < 6:
                    await asyncio.sleep(0.01)
                assert hanging.is_set()  # one try to the stuck endpoint is under way, the whole time
            finally:
                release.set()
                running.cancel()
                await asyncio.gather(running, return_exceptions=True)

        asyncio.run(asyncio.wait_for(scenario(), 30))
    assert sorted(body["data"]["job_id"] for body in receiver.bodies()) == [f"job{n}" for n in range(6)]
    store.close()
    queue.close()


@contextmanager
def threaded_http(handler: type[BaseHTTPRequestHandler]) -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
