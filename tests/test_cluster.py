"""Clusters on loopback: a real redis-server (AOF on), API nodes (`zimage serve --queue redis://...
--workers 0`) and workers (`zimage worker`), sharing one data dir, with the nano model. Each test starts
a cluster of its own (its own data dir and key prefix), so no job of one test reaches the next.

A worker killed with SIGKILL mid-job, or frozen until its lease runs out, has its job finished by the
other; Redis restarted mid-queue loses nothing (and POST /prompt answers 503 with Retry-After while it
is down); a socket on one node sees the events of a job posted to the other; 1,000 jobs through both
nodes and both workers end once each, each with one file."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook
from websockets.sync.client import connect

from tests.redis_server import RedisServer, running_redis
from tests.server import Server, WorkerProc, free_port, next_message, running_server, running_worker
from tests.support.metrics import samples, scrape, value
from tests.test_webhooks import receiving
from tests.workflows import nano_prompt

LEASE = "3"  # seconds: a frozen worker loses its job after this, and heartbeats come every second


@dataclass
class Cluster:
    redis: RedisServer
    url: str  # the queue's URL, with this cluster's own prefix
    nodes: list[Server]
    workers: list[WorkerProc]
    data: Path
    stack: ExitStack

    def add_worker(self) -> WorkerProc:
        port = free_port()
        worker = self.stack.enter_context(
            running_worker(self.data, self.url, "--lease", LEASE, "--metrics-port", str(port))
        )
        worker.metrics_port = port
        self.workers.append(worker)
        return worker

    def live_workers(self) -> list[dict[str, Any]]:
        status, found = self.nodes[0].json("GET", "/api/zimage/workers")
        assert status == 200 and found["queue"] == "redis"
        return [w for w in found["workers"] if w["heartbeat_age_s"] < 3 * float(LEASE)]


def wait_for(
    condition: Callable[[], Any],
    timeout: float = 60,
    what: str = "the condition",
    state: Callable[[], Any] | None = None,
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = condition()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}" + (f"; state: {state()}" if state else ""))
        time.sleep(0.1)


@contextmanager
def running_cluster(base: Path, redis: RedisServer, nodes: int = 2, workers: int = 2) -> Iterator[Cluster]:
    """`nodes` API nodes and `workers` ready workers on their own key prefix of `redis`."""
    data = base / "data"
    url = f"{redis.url}?prefix=c{uuid.uuid4().hex[:10]}:"
    with ExitStack() as stack:
        started = [
            stack.enter_context(
                running_server(
                    data, "--queue", url, "--workers", "0", "--lease", LEASE, "--webhook-allow", "127.0.0.0/8"
                )
            )
            for _ in range(nodes)
        ]
        found = Cluster(redis, url, started, [], data, stack)
        for _ in range(workers):
            found.add_worker()
        wait_for(lambda: sum(w["state"] == "ready" for w in found.live_workers()) == workers, 120, "ready workers")
        yield found


@pytest.fixture
def cluster(tmp_path: Path, redis_server: RedisServer) -> Iterator[Cluster]:
    """Two API nodes and two workers on the session's redis-server."""
    with running_cluster(tmp_path, redis_server) as found:
        yield found


def long_job(tag: str) -> dict[str, Any]:
    """The nano workflow at 200 steps: a few seconds on this CPU, long enough to be caught running (a seed
    of its own, so no worker has its latents cached)."""
    prompt = nano_prompt()
    prompt["3"]["inputs"]["steps"] = 200
    prompt["3"]["inputs"]["seed"] = int(uuid.uuid4().int % 2**32)
    prompt["9"]["inputs"]["filename_prefix"] = tag
    return prompt


def quick_job(tag: str, colour: int) -> dict[str, Any]:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": colour}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": tag}},
    }


def post(node: Server, prompt: dict[str, Any], **extra: Any) -> str:
    status, answer = node.json("POST", "/prompt", {"prompt": prompt, **extra})
    assert status == 200, answer
    return str(answer["prompt_id"])


def ended(node: Server, prompt_id: str) -> dict[str, Any] | None:
    status, history = node.json("GET", f"/history/{prompt_id}")
    if status == 503:  # the queue is away (for a second after each failed try): not yet known
        return None
    assert status == 200
    return history.get(prompt_id)


def outputs_named(cluster: Cluster, tag: str) -> list[Path]:
    return sorted((cluster.data / "output").glob(f"{tag}_*.png"))


def worker_running(cluster: Cluster, prompt_id: str, other_than: int | None = None) -> dict[str, Any] | None:
    """The worker whose last heartbeat listed `prompt_id` as running (not the one with pid `other_than`)."""
    for worker in cluster.live_workers():
        if worker["pid"] != other_than and any(r["prompt_id"] == prompt_id for r in worker["running"]):
            return worker
    return None


def test_jobs_through_two_nodes_and_two_workers_end_once_each_seen_from_every_node(cluster: Cluster) -> None:
    """A socket on one node sees the events of a job posted to the other; then 1,000 jobs through both
    nodes and both workers end once each, each with one file, counted by the workers that ran them and
    each in one API node's audit log."""
    first, second = cluster.nodes
    client_id = uuid.uuid4().hex
    with connect(f"{second.ws_url}?clientId={client_id}", open_timeout=10) as events:
        assert next_message(events, timeout=10)["type"] == "status"
        prompt = nano_prompt()
        prompt["9"]["inputs"]["filename_prefix"] = "across"
        prompt_id = post(first, prompt, client_id=client_id)
        kinds, previews = [], 0
        while True:
            received = events.recv(timeout=60)
            if isinstance(received, bytes):  # a live preview, from a worker on another machine
                previews += received[:8] == b"\x00\x00\x00\x01\x00\x00\x00\x01"
                continue
            message = json.loads(received)
            if message["data"].get("prompt_id") not in (prompt_id, None):
                continue
            kinds.append(message["type"])
            if message["type"] == "executing" and message["data"]["node"] is None:
                break
    assert kinds.count("progress") == 8 and "executed" in kinds and "execution_success" in kinds
    assert previews >= 1
    assert kinds.index("execution_start") < kinds.index("execution_success") < len(kinds) - 1
    entry = ended(second, prompt_id)  # the history is the cluster's: the other node has it too
    assert entry is not None and entry["status"]["completed"]

    # Comfy API v2 likewise: submitted on one node, followed on the other's event stream, its output read
    # through either (the job, its asset records and its files are the cluster's).
    v2 = nano_prompt()
    v2["9"]["inputs"]["filename_prefix"] = "across-v2"
    status, job = first.json("POST", "/api/v2/jobs", {"workflow": v2})
    assert status == 201, job
    stream = http.client.HTTPConnection("127.0.0.1", second.port, timeout=60)
    stream.request("GET", f"/api/v2/jobs/{job['id']}/events")
    response = stream.getresponse()
    assert response.status == 200
    statuses = [json.loads(line[6:]) for line in response if line.startswith(b"data: ") and b'"status"' in line]
    stream.close()
    assert statuses[-1]["status"] == "succeeded" and len(statuses[-1]["outputs"]) == 1
    output = statuses[-1]["outputs"][0]
    for node in (first, second):
        status, _, image = node.request("GET", f"/api/v2/assets/{output['id']}/content")
        assert status == 200 and image[:8] == b"\x89PNG\r\n\x1a\n"

    # A webhook registered on one node, named by a job posted to the other: each event is sent once, by
    # whichever node's dispatcher leased it, signed, with the job's labels.
    receiver = cluster.stack.enter_context(receiving())  # open to the end: a second sending would show
    status, made = first.json("POST", "/api/zimage/webhooks", {"name": "erp", "url": receiver.url})
    assert status == 201, made
    hooked = post(second, quick_job("hooked", 7), extra_data={"webhook": "erp", "metadata": {"sku": "A1"}})
    wait_for(lambda: receiver.bodies("job.succeeded"), 60, "the job's webhook")

    ids: list[str] = []
    lock = threading.Lock()

    def send(node: Server, start: int) -> None:
        for i in range(start, 1000, 4):
            posted = post(node, quick_job("load", i))
            with lock:
                ids.append(posted)

    senders = [threading.Thread(target=send, args=(cluster.nodes[i % 2], i)) for i in range(4)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    assert len(set(ids)) == 1000

    def finished() -> bool:
        status, history = second.json("GET", "/history?max_items=2000")
        return status == 200 and len(set(ids) & set(history)) == 1000

    wait_for(finished, 300, "a thousand jobs")
    status, queue = first.json("GET", "/queue")
    assert status == 200 and queue == {"queue_running": [], "queue_pending": []}
    assert len(outputs_named(cluster, "load")) == 1000  # none run twice to completion, none lost
    status, history = first.json("GET", "/history?max_items=2000")
    assert all(history[i]["status"]["completed"] for i in ids)

    # metrics: every live worker's heartbeat on the API node; each job counted by the worker that ran it
    found = scrape(second)
    live = {w["id"] for w in cluster.live_workers()}
    beats = {
        dict(labels)["worker"]: v
        for (name, labels), v in found.items()
        if name == "zimage_worker_heartbeat_age_seconds"
    }
    assert live <= set(beats) and all(beats[w] < 3 * float(LEASE) for w in live)
    assert value(found, "zimage_queue_jobs", state="pending") == 0 and value(found, "zimage_queue_up") == 1
    counted = 0.0
    for worker in cluster.workers:
        assert worker.metrics_port is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=10) as answer:
            counted += value(samples(answer.read().decode()), "zimage_jobs_ended_total", outcome="success")
    assert counted == 1003  # the three jobs through both nodes, and the thousand

    # the audit: each end in one API node's log, once; every log verifies
    command = [sys.executable, "-m", "zimage_serve.cli", "audit"]
    places = [["--data-dir", str(cluster.data), "--node", f"{socket.gethostname()}-{n.port}"] for n in cluster.nodes]

    def logged() -> list[str]:
        found = []
        for where in places:
            exported = subprocess.run([*command, "export", *where], capture_output=True, text=True, timeout=60)
            found += [r["job_id"] for r in map(json.loads, exported.stdout.splitlines()) if r["kind"] == "generation"]
        return found

    ends = wait_for(lambda: len(found := logged()) >= 1003 and found, 60, "every end in a log")
    assert sorted(ends) == sorted([prompt_id, job["id"], hooked, *ids])  # in one node's log, once each
    for where in places:
        checked = subprocess.run([*command, "verify", *where], capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0 and "intact" in checked.stderr, checked.stderr

    # by now any second sending of the webhook's events would have come
    assert sorted(body["type"] for body in receiver.bodies()) == ["job.queued", "job.started", "job.succeeded"]
    for headers, body in receiver.received:
        event = Webhook(made["secret"]).verify(body, headers)
        assert event["data"]["job_id"] == hooked and event["data"]["metadata"] == {"sku": "A1"}
    assert len({headers["webhook-id"] for headers, _ in receiver.received}) == 3


def sampling(cluster: Cluster, prompt_id: str) -> dict[str, Any] | None:
    """The worker whose heartbeat says it is sampling `prompt_id` (node 3, KSampler): well into its steps."""
    holder = worker_running(cluster, prompt_id)
    if holder and any(r["prompt_id"] == prompt_id and r["node"] == "3" for r in holder["running"]):
        return holder
    return None


def test_a_worker_killed_mid_job_has_its_job_finished_by_the_other(tmp_path: Path, redis_server: RedisServer) -> None:
    with running_cluster(tmp_path, redis_server, nodes=1) as cluster:
        node = cluster.nodes[0]
        prompt_id = post(node, long_job("killed"))
        holder = wait_for(lambda: sampling(cluster, prompt_id), 60, "the job to be sampled", cluster.live_workers)
        os.kill(holder["pid"], signal.SIGKILL)
        wait_for(lambda: worker_running(cluster, prompt_id, other_than=holder["pid"]), 30, "the job to run again")
        entry = wait_for(lambda: ended(node, prompt_id), 300, "the job to end")
        assert entry["status"]["completed"] and entry["status"]["status_str"] == "success"
        [image] = entry["outputs"]["9"]["images"]
        assert [p.name for p in outputs_named(cluster, "killed")] == [image["filename"]]  # one file, not two


def test_a_frozen_worker_loses_its_job_when_its_lease_runs_out(tmp_path: Path, redis_server: RedisServer) -> None:
    with running_cluster(tmp_path, redis_server, nodes=1) as cluster:
        node = cluster.nodes[0]
        prompt_id = post(node, long_job("frozen"))
        holder = wait_for(lambda: worker_running(cluster, prompt_id), 60, "the job to start", cluster.live_workers)
        os.kill(holder["pid"], signal.SIGSTOP)  # alive, but no heartbeat: only its lease can free the job
        [frozen] = [w for w in cluster.workers if w.pid == holder["pid"]]
        try:
            stopped_at = time.monotonic()
            wait_for(lambda: worker_running(cluster, prompt_id, other_than=holder["pid"]), 30, "the re-run")
            assert time.monotonic() - stopped_at >= float(LEASE) - 1.5  # not before the lease ran out
            # It wakes up and goes on with its stale run: fenced, it records nothing and names no file.
            os.kill(holder["pid"], signal.SIGCONT)
            entry = wait_for(lambda: ended(node, prompt_id), 300, "the job to end")
            assert entry["status"]["completed"]
            wait_for(lambda: "its run here is dropped" in frozen.log.read_text(), 300, "the stale run to end")
        finally:
            os.kill(holder["pid"], signal.SIGKILL)
        assert len(outputs_named(cluster, "frozen")) == 1
        assert ended(node, prompt_id) == entry  # the history entry is the other worker's, untouched


def test_redis_restarted_mid_queue_loses_nothing(tmp_path: Path) -> None:
    with running_redis(tmp_path / "redis") as redis, running_cluster(tmp_path, redis, workers=1) as cluster:
        first, second = cluster.nodes
        ids = [post((first, second)[i % 2], quick_job("restart", i)) for i in range(40)]
        redis.stop()
        asked = time.monotonic()
        status, headers, body = first.request("POST", "/prompt", {"prompt": quick_job("refused", 1)})
        assert status == 503 and int(headers["retry-after"]) >= 1, body
        assert time.monotonic() - asked < 10  # answered, not left hanging on the connection
        assert first.request("GET", "/system_stats")[0] == 200  # what needs no queue still answers
        assert json.loads(body)["error"]["type"] == "queue_unavailable"
        assert first.request("GET", "/queue")[0] == 503
        wait_for(lambda: all("lost the" in w.log.read_text() for w in cluster.workers), 30, "the worker to notice")
        redis.start()
        wait_for(lambda: all(ended(second, i) for i in ids), 120, "every job to end")
        assert all(ended(first, i)["status"]["completed"] for i in ids)  # type: ignore[index]
        assert len(outputs_named(cluster, "restart")) == 40 and outputs_named(cluster, "refused") == []
        post(second, quick_job("after", 7))  # the nodes reconnected by themselves
