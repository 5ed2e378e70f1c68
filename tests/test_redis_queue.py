"""The Redis queue itself, on a real redis-server: what a restart keeps, what an unreachable Redis
answers, the audit outbox, and races between connections. What every queue must do is in
test_queue_contract.py."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

from tests.redis_server import RedisServer, running_redis
from tests.support.app import serving
from tests.support.jobs import small_job, wait_until
from tests.support.queues import Clock, enqueue
from zimage_serve.identity import JobContext
from zimage_serve.queue.jobs import Job, NewJob, QueueUnavailable
from zimage_serve.queue.redis_queue import FAIL_FAST_S, RedisQueue


def queue_on(server: RedisServer, **options: object) -> RedisQueue:
    return RedisQueue(server.url, prefix=f"t-{uuid.uuid4().hex[:8]}:", **options)  # type: ignore[arg-type]


def add(store: RedisQueue, job_id: str) -> None:
    enqueue(store, job_id, store.next_number(), {"1": {"class_type": "X"}}, {"client_id": "c"}, ["1"])


def test_a_restart_with_aof_keeps_every_acknowledged_job(tmp_path: Path) -> None:
    with running_redis(tmp_path / "redis") as server:
        store = queue_on(server)
        for i in range(20):
            add(store, f"job{i}")
        running = store.claim("machine-2:1:aa", lease_s=60)
        assert running is not None
        store.finish("job0", "success", {"outputs": {"9": {}}}, claim_next=True, worker="machine-2:1:aa")
        server.stop(kill=True)  # SIGKILL: no shutdown save, only the append-only file
        with pytest.raises(QueueUnavailable, match="cannot be reached"):
            store.count("pending")
        with pytest.raises(QueueUnavailable, match="a moment ago"):  # fails fast, no second connect timeout
            store.count("pending")
        server.start()

        def reached() -> bool:
            try:
                store.count("pending")
            except QueueUnavailable:  # still within the fail-fast second
                return False
            return True

        wait_until(reached, timeout=10 * FAIL_FAST_S)
        assert store.count("pending") == 18 and [j.id for j in store.running()] == ["job1"]
        assert [j.id for j in store.history()] == ["job0"] and store.next_number() == 20
        assert [j.id for j in store.pending()] == [f"job{i}" for i in range(2, 20)]


def test_an_unreachable_redis_fails_fast(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "never-started")
    store = RedisQueue(server.url)
    started = time.monotonic()
    with pytest.raises(QueueUnavailable):
        enqueue(store, "a", 0, {}, {}, [])
    assert time.monotonic() - started < 5 and not store.ping()  # refused at once, not its 10 s socket timeout


def test_each_job_is_handed_out_once_to_workers_racing_for_it(redis_server: RedisServer) -> None:
    first = queue_on(redis_server)
    for i in range(200):
        add(first, f"job{i}")
    claimed: list[str] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        store = RedisQueue(redis_server.url, prefix=first.prefix)
        job = store.claim(name)
        while job is not None:
            with lock:
                claimed.append(job.id)
            job = store.finish(job.id, "success", {}, claim_next=True, worker=name)

    workers = [threading.Thread(target=work, args=(f"w:{i}:x",)) for i in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert sorted(claimed) == sorted(f"job{i}" for i in range(200)) and len(set(claimed)) == 200
    assert first.count("success") == 200 and first.count_finished() == 200 and first.count("running") == 0


def test_recovery_on_two_nodes_at_once_moves_a_job_once(redis_server: RedisServer) -> None:
    clock = Clock()
    first = queue_on(redis_server, clock=clock)
    second = RedisQueue(redis_server.url, prefix=first.prefix, clock=clock)
    add(first, "a")
    assert first.claim("machine-7:1:aa", lease_s=5) is not None
    clock.advance(6)
    moved = first.recover() + second.recover()
    assert [j.id for j in moved] == ["a"] and first.count("pending") == 1


def test_a_heartbeat_between_reading_and_moving_keeps_the_job(redis_server: RedisServer) -> None:
    clock = Clock()
    store = queue_on(redis_server, clock=clock)
    add(store, "a")
    assert store.claim("machine-7:1:aa", lease_s=5) is not None
    clock.advance(6)
    [job] = store.running()
    store.heartbeat("machine-7:1:aa", 30)  # renewed after the lease was read as run out
    assert not store._run("RELEASE", "a", "retry", "", job.worker, f"{job.lease:.6f}", 100)
    assert [j.id for j in store.running()] == ["a"]


def test_every_end_is_written_to_the_audit_outbox_with_its_owner(redis_server: RedisServer) -> None:
    store = queue_on(redis_server)
    store.enqueue_many([NewJob.of(Job("a", 1, {}, {}, [], owner="alice", context=JobContext("user")))])
    enqueue(store, "b", 2, {}, {}, [])
    for _ in range(2):
        job = store.claim()
        assert job is not None
        store.finish(job.id, "success" if job.id == "a" else "error", {"outputs": {}})
    entries = store.redis.xrange(store.prefix + "audit")
    assert [(e["job_id"], e["owner"], e["state"]) for _, e in entries] == [
        ("a", "alice", "success"),
        ("b", "", "error"),
    ]
    assert entries[0][1]["context"] == '{"role": "user"}' and float(entries[0][1]["finished"]) > 0


def test_a_redis_at_its_maxmemory_answers_503_and_shows_in_the_metrics(tmp_path: Path) -> None:
    with running_redis(tmp_path / "redis", "--maxmemory-policy", "noeviction") as full:
        prefix = f"t-{uuid.uuid4().hex[:8]}:"
        url = full.url + f"?prefix={prefix}"
        with serving(tmp_path / "data", queue=url, workers=0, preload=False) as server:
            assert server.json("POST", "/prompt", {"prompt": small_job("before")})[0] == 200
            operator = redis.Redis.from_url(full.url)
            operator.config_set("maxmemory", "1")  # it holds more than its maxmemory: every write is refused
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                operator.set("anything", b"x")
            status, headers, body = server.request("POST", "/prompt", {"prompt": small_job("refused")})
            assert status == 503 and headers["retry-after"] == "5" and b"out of memory" in body, body
            assert server.json("GET", "/queue")[0] == 200  # reads go on
            metrics = server.request("GET", "/metrics")[2].decode()
            assert 'zimage_queue_unavailable_total{reason="out_of_memory"}' in metrics
            operator.config_set("maxmemory", "0")  # room again
            assert server.json("POST", "/prompt", {"prompt": small_job("after")})[0] == 200
