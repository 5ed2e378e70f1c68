"""The webhook store contract (`webhooks/store.Webhooks`), run against both: the SQLite queue's file (its
triggers write the outbox) and a cluster's Redis (the queue's scripts do). Events, endpoints, leases,
retries, dead letters, replay."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.redis_server import RedisServer
from tests.support.queues import enqueue
from zimage_serve.queue.contract import JobQueue
from zimage_serve.queue.redis_queue import RedisQueue
from zimage_serve.queue.sqlite_queue import SQLiteQueue
from zimage_serve.webhooks.redis_store import RedisWebhookStore
from zimage_serve.webhooks.store import Delivery, WebhookError, Webhooks, WebhookStore

Opened = tuple[JobQueue, Webhooks]


def sqlite_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Opened:
    queue = SQLiteQueue(tmp_path / "queue.sqlite3")
    return queue, WebhookStore(tmp_path / "queue.sqlite3")


def redis_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Opened:
    server: RedisServer = request.getfixturevalue("redis_server")
    queue = RedisQueue(server.url, prefix=f"test-{uuid.uuid4().hex[:12]}:")
    return queue, RedisWebhookStore(queue.redis, queue.prefix, queue.call)


BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], Opened]] = {
    "sqlite": sqlite_backend,
    "redis": redis_backend,
}


@pytest.fixture(params=sorted(BACKENDS))
def opened(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opened]:
    queue, store = BACKENDS[request.param](request, tmp_path)
    yield queue, store
    store.close()
    queue.close()


def due(store: Webhooks, lease_s: float = 60.0) -> list[Delivery]:
    return store.claim(time.time() + 5, 100, lease_s)


def test_each_change_of_a_job_writes_its_events_for_the_endpoints_it_goes_to(opened: Opened) -> None:
    """Queued, started, failed and canceled (a waiting job deleted, or canceled before it ran), with the job's
    labels, for every subscribed endpoint and the one a job names."""
    queue, store = opened
    store.add("all", "https://a.example", subscribe=True)
    store.add("named", "https://b.example", ["canceled"])
    store.add("alices", "https://c.example", owner="alice", subscribe=True)
    labels = {"sku": "A1", "big": 1234567890123456789, "tags": [], "path": "a/b", "名": "鞋"}
    enqueue(queue, "one", 1.0, {"1": {}}, {"metadata": labels}, ["1"])
    enqueue(queue, "two", 2.0, {"1": {}}, {"webhook": "named"}, ["1"])
    enqueue(queue, "odd", 3.0, {"1": {}}, {"webhook": ["not", "a", "name"]}, ["1"])
    claimed = queue.claim()
    assert claimed is not None and claimed.id == "one"
    queue.finish("one", "error", {"outputs": {}, "status": {"status_str": "error", "messages": [["m", {}]]}})
    assert queue.delete_pending(["two"]) == 1
    seen = [(d.job_id, d.event, d.endpoint.name) for d in due(store)]  # in the order they happened
    assert sorted(seen) == sorted([
        ("one", "queued", "all"), ("two", "queued", "all"), ("odd", "queued", "all"), ("one", "started", "all"),
        ("one", "failed", "all"), ("two", "canceled", "all"), ("two", "canceled", "named"),
    ])  # fmt: skip
    assert [event for job, event, _ in seen if job == "one"] == ["queued", "started", "failed"]
    assert seen.index(("odd", "queued", "all")) < seen.index(("one", "started", "all"))
    assert store.waiting() == 7
    again = store.claim(time.time() + 120, 100, 60)  # the leases ran out: each is taken again
    [started] = [d for d in again if d.event == "started"]
    assert started.attempt == 1 and started.attempts == 2  # the job's first run; this delivery's second claim
    assert all(d.window_from < time.time() + 10 for d in again)  # the retry window began at the first claim
    [failed] = [d for d in again if d.event == "failed"]
    assert json.loads(failed.result or "{}")["status"]["status_str"] == "error"
    assert json.loads(failed.metadata or "null") == labels  # exactly as sent: numbers, lists, text
    assert len({d.id for d in again}) == 7  # a webhook-id per event and endpoint


def test_a_delivery_is_leased_retried_given_up_on_and_replayed(opened: Opened) -> None:
    queue, store = opened
    store.add("shop", "https://shop.example/hook", ["queued"])
    enqueue(queue, "job", 1.0, {"1": {}}, {"webhook": "shop"}, ["1"])
    [delivery] = due(store)
    assert delivery.attempts == 1 and delivery.endpoint.name == "shop" and delivery.secret.startswith("whsec_")
    assert due(store) == []  # leased to the first caller

    store.failed(delivery, "answered 500", time.time() + 30)
    assert due(store) == []  # not before its retry
    [again] = store.claim(time.time() + 31, 100, 60)
    assert again.id == delivery.id and again.attempts == 2
    store.failed(delivery, "a stale try", None)  # its lease is the earlier claim's: it records nothing
    assert store.dead_letters() == []

    store.failed(again, "answered 410", None)  # given up on
    [dead] = store.dead_letters()
    assert dead["id"] == delivery.id and dead["endpoint"] == "shop" and dead["error"] == "answered 410"
    assert store.claim(time.time() + 3600, 100, 60) == []
    assert store.replay([]) == 0 and store.replay(["msg_nothing"]) == 0
    assert store.replay([delivery.id]) == 1 and store.dead_letters() == []
    [replayed] = due(store)
    assert replayed.id == delivery.id and replayed.attempts == 1  # fresh attempts
    store.delivered([(replayed.seq, replayed.lease_until)])
    assert store.waiting() == 0 and store.claim(time.time() + 3600, 100, 60) == []

    enqueue(queue, "later", 2.0, {"1": {}}, {"webhook": "shop"}, ["1"])
    [late] = due(store)
    store.failed(late, "refused", None)
    assert store.forget_dead(time.time() - 60) == 0 and len(store.dead_letters()) == 1
    assert store.forget_dead(time.time() + 1) == 1 and store.dead_letters() == []


def test_endpoints_are_named_once_used_by_their_owner_and_removed_with_their_deliveries(opened: Opened) -> None:
    queue, store = opened
    endpoint, secret = store.add("alices", "https://a.example/hook", ["queued", "succeeded"], owner="alice")
    assert endpoint.events == ("queued", "succeeded") and secret not in json.dumps(endpoint.public())
    with pytest.raises(WebhookError, match="exists already"):
        store.add("alices", "https://other.example")
    with pytest.raises(WebhookError, match="url"):
        store.add("bad", "file:///etc/passwd")
    assert store.usable("alices", "alice") and not store.usable("alices", "bob") and not store.usable("x", "alice")
    assert [e.name for e in store.endpoints()] == ["alices"] and store.endpoint("alices") == endpoint
    enqueue(queue, "job", 1.0, {"1": {}}, {"webhook": "alices"}, ["1"])
    assert store.waiting() == 0  # a job of no one's (the local operator's) may not use alice's endpoint
    store.add("anyone", "https://b.example", ["queued"])
    enqueue(queue, "job2", 2.0, {"1": {}}, {"webhook": "anyone"}, ["1"])
    assert store.waiting() == 1
    assert store.remove("anyone") and not store.remove("anyone")
    assert store.waiting() == 0 and store.claim(time.time() + 5, 100, 60) == []
    assert store.has_endpoints  # the claim saw alice's


def test_with_no_endpoint_a_claim_says_so(opened: Opened) -> None:
    _, store = opened
    assert store.claim(time.time(), 10, 60) == [] and not store.has_endpoints
    store.add("one", "https://a.example")
    assert store.has_endpoints


def test_a_claim_takes_a_share_of_each_endpoint_and_none_of_a_busy_one(opened: Opened) -> None:
    queue, store = opened
    slow, _ = store.add("slow", "https://slow.example", ["queued"], subscribe=True)
    store.add("fast", "https://fast.example", ["queued"], subscribe=True)
    for n in range(4):
        enqueue(queue, f"job{n}", float(n), {"1": {}}, {}, ["1"])
    now = time.time() + 5
    first = store.claim(now, 16, 60, 2)
    assert sorted(d.endpoint.name for d in first) == ["fast", "fast", "slow", "slow"]
    assert [d.job_id for d in first if d.endpoint.name == "fast"] == ["job0", "job1"]  # the oldest first
    second = store.claim(now, 16, 60, 2, {slow.id: 2})  # two to slow under way: none of it
    assert [(d.endpoint.name, d.job_id) for d in second] == [("fast", "job2"), ("fast", "job3")]
    assert store.waiting() == 8


def test_a_backlog_of_one_endpoint_never_stands_in_front_of_another(opened: Opened) -> None:
    """However much waits for a busy endpoint, the others' deliveries go."""
    queue, store = opened
    slow, _ = store.add("slow", "https://slow.example", ["queued"], subscribe=True)
    for n in range(200):
        enqueue(queue, f"backlog{n}", float(n), {"1": {}}, {}, ["1"])
    store.add("fast", "https://fast.example", ["queued"], subscribe=True)
    enqueue(queue, "late", 999.0, {"1": {}}, {}, ["1"])
    now = time.time() + 5
    taken: list[str] = []
    for _ in range(4):  # a few turns of a dispatcher with two tries under way to slow the whole time
        taken += [d.endpoint.name for d in store.claim(now, 16, 60, 2, {slow.id: 2})]
        now += 0.01
    assert taken == ["fast"]
