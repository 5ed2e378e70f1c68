"""The queue contract (`queue/contract.JobQueue`), run against every implementation: order, limits,
history, counts, and what a crashed worker leaves behind. A backend is a way to open connections to one
queue; "reopened" means a new connection, as a restarted process makes."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.redis_server import RedisServer
from tests.support.queues import Clock, enqueue
from zimage_serve.identity import JobContext
from zimage_serve.queue.contract import JobQueue
from zimage_serve.queue.jobs import DuplicateJob, HistoryLimits, Job, NewJob, QueueFull, Quota, QuotaExceeded
from zimage_serve.queue.redis_queue import RedisQueue
from zimage_serve.queue.sqlite_queue import SQLiteQueue

Connect = Callable[..., JobQueue]


def sqlite_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Connect:
    return lambda **options: SQLiteQueue(tmp_path / "q.db", **options)


def redis_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Connect:
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix = f"test-{uuid.uuid4().hex[:12]}:"  # one queue per test on the shared server
    return lambda **options: RedisQueue(server.url, prefix=prefix, **options)


BACKENDS = {"sqlite": sqlite_backend, "redis": redis_backend}


@pytest.fixture(params=sorted(BACKENDS))
def connect(request: pytest.FixtureRequest, tmp_path: Path) -> Connect:
    return BACKENDS[request.param](request, tmp_path)


def add(store: JobQueue, job_id: str, number: float | None = None) -> None:
    enqueue(store, job_id, store.next_number() if number is None else number, {"1": {"class_type": "X"}}, {}, ["1"])


def test_lowest_number_first_then_submission_order(connect: Connect) -> None:
    store = connect()
    for name in ("a", "b", "c"):
        add(store, name)
    add(store, "urgent", -1)
    add(store, "tie", 1)  # same number as "b", submitted later
    assert [j.id for j in store.pending()] == ["urgent", "a", "b", "tie", "c"]
    claimed = [store.claim() for _ in range(5)]
    assert [j.id for j in claimed if j] == ["urgent", "a", "b", "tie", "c"]
    assert store.claim() is None
    assert claimed[1] is not None and claimed[1].state == "running" and claimed[1].attempts == 1


def test_running_jobs_are_listed_by_start_whatever_their_numbers(connect: Connect) -> None:
    store = connect()
    add(store, "late", 5)
    add(store, "early", 9)
    assert (first := store.claim()) is not None and first.id == "late"
    add(store, "front", -1)  # queued in front after "late" started: it is claimed next, before "early"
    assert (second := store.claim()) is not None and second.id == "front"
    assert [j.id for j in store.running()] == ["late", "front"] and [j.id for j in store.pending()] == ["early"]
    assert store.delete_pending() == 1 and [j.id for j in store.running()] == ["late", "front"]


def test_numbers_keep_increasing_across_restarts(connect: Connect) -> None:
    store = connect()
    for name in ("a", "b", "c"):
        add(store, name)
    assert [j.number for j in store.pending()] == [0, 1, 2]
    store.next_number()  # a prompt that then failed validation: counted, as ComfyUI does, but not stored
    # Killed before closing (a file's counter not saved): past the highest number stored.
    after_crash = connect().next_number()
    assert after_crash >= 3
    store.close()  # closed cleanly: past every number handed out
    assert connect().next_number() > max(after_crash, 3)


def test_counts_follow_every_change_and_survive_a_reconnection(connect: Connect) -> None:
    store = connect()
    for name in "abcdef":
        add(store, name)
    first, second = store.claim(), store.claim()
    assert first is not None and second is not None
    store.finish(first.id, "success", {})
    store.delete_pending(["c"])
    store.finish(second.id, "error", {})
    store.claim()
    store.delete_history([first.id])
    expected = {"pending": 2, "running": 1, "success": 0, "error": 1, "interrupted": 0}
    assert {s: store.count(s) for s in expected} == expected
    store.close()
    reopened = connect()
    assert {s: reopened.count(s) for s in expected} == expected
    reopened.recover()
    assert reopened.count("running") == 0 and reopened.count("pending") == 3


def test_duplicates_and_a_full_queue_are_refused(connect: Connect) -> None:
    store = connect(max_pending=2)
    add(store, "a")
    with pytest.raises(DuplicateJob, match="prompt_id a already exists"):
        add(store, "a")
    add(store, "b")
    with pytest.raises(QueueFull, match="2 jobs waiting"):
        add(store, "c")
    store.claim()
    add(store, "c")  # a running job no longer counts as waiting
    assert store.count("pending") == 2


def test_history_entries_have_comfyuis_shape(connect: Connect) -> None:
    store = connect()
    for name in ("a", "b", "c"):
        add(store, name)
    for state in ("success", "error", "interrupted"):
        job = store.claim()
        assert job is not None
        store.finish(job.id, state, {"outputs": {"9": {"images": []}}, "messages": [["execution_start", {}]]})
    entry = store.history()[0].history_entry()
    assert entry == {
        "prompt": [0, "a", {"1": {"class_type": "X"}}, {}, ["1"]],
        "outputs": {"9": {"images": []}},
        "status": {"status_str": "success", "completed": True, "messages": [["execution_start", {}]]},
        "meta": {"9": {"node_id": "9", "display_node": "9", "parent_node": None, "real_node_id": "9"}},
    }
    assert [j.history_entry()["status"]["status_str"] for j in store.history()] == ["success", "error", "error"]
    assert [j.id for j in store.history(max_items=2)] == ["b", "c"]  # the newest two
    assert [j.id for j in store.history(max_items=1, offset=0)] == ["a"]
    assert store.delete_history(["a", "nope"]) == 1
    assert store.delete_history() == 2 and store.history() == []


def test_deleting_waiting_jobs_leaves_the_running_one(connect: Connect) -> None:
    store = connect()
    for name in ("a", "b", "c"):
        add(store, name)
    store.claim()
    assert store.delete_pending(["b", "a"]) == 1
    assert store.delete_pending() == 1
    assert [j.id for j in store.running()] == ["a"] and store.pending() == []


def test_a_job_left_running_by_a_crash_runs_again_then_fails(connect: Connect) -> None:
    store = connect()
    add(store, "a")
    store.claim()
    reopened = connect()  # the first process "died" without finishing
    [job] = reopened.recover()
    assert (job.id, job.state, job.attempts) == ("a", "pending", 1)
    again = reopened.claim()
    assert again is not None and again.attempts == 2
    [job] = connect().recover()
    assert job.state == "error"
    entry = reopened.get("a")
    assert entry is not None and entry.state == "error"
    status = entry.history_entry()["status"]
    assert status["status_str"] == "error" and not status["completed"]
    assert "stopped while this prompt ran (2 times)" in status["messages"][0][1]["exception_message"]


def test_two_connections_see_each_others_counts(connect: Connect) -> None:
    server, worker = connect(max_pending=2), connect()
    add(server, "a")
    add(server, "b")
    with pytest.raises(QueueFull):
        add(server, "c")
    job = worker.claim()  # the worker process takes one: the server may queue another
    assert job is not None and server.count("running") == 1 and server.count("pending") == 1
    add(server, "c")
    worker.finish(job.id, "success", {})
    assert server.count("success") == 1 and server.count_finished() == 1


def test_finishing_can_hand_out_the_next_job_in_the_same_transaction(connect: Connect) -> None:
    store = connect()
    for name in ("a", "b"):
        add(store, name)
    first = store.claim()
    assert first is not None and first.id == "a"
    following = store.finish("a", "success", {}, claim_next=True)
    assert following is not None and following.id == "b" and following.state == "running"
    assert store.count("running") == 1 and store.count("pending") == 0 and store.count("success") == 1
    assert store.finish("b", "error", {}, claim_next=True) is None
    assert store.count("running") == 0 and store.count_finished() == 2


def test_the_queue_as_json_text_equals_the_parsed_queue_items(connect: Connect) -> None:
    store = connect()
    prompt = {"1": {"class_type": "X", "inputs": {"text": '蓝色 "quoted"'}}}
    enqueue(store, "a", 3.0, prompt, {"client_id": "c"}, ["1"])
    enqueue(store, "b", -1.5, {"2": {}}, {}, ["2"])
    enqueue(store, "c", 7.0, {"3": {}}, {}, ["3"])
    store.claim()
    for state, jobs in (("pending", store.pending()), ("running", store.running())):
        spliced = [json.loads(text) for text in store.queue_items_json(state)]
        assert spliced == [job.queue_item() for job in jobs]
    assert [item[0] for item in map(json.loads, store.queue_items_json("pending"))] == [3, 7]


def test_a_burst_is_stored_in_one_transaction_and_each_job_gets_its_own_answer(connect: Connect) -> None:
    store = connect(max_pending=4)
    add(store, "taken", 0)
    prompt = {"1": {"class_type": "X"}}
    ids = (("a", 1), ("taken", 2), ("b", 3), ("a", 4), ("c", 5), ("d", 6))
    results = store.enqueue_many([NewJob.of(Job(i, n, prompt, {}, ["1"])) for i, n in ids])
    kinds = [type(r).__name__ for r in results]
    assert kinds == ["Job", "DuplicateJob", "Job", "DuplicateJob", "Job", "QueueFull"]
    assert [j.id for j in store.pending()] == ["taken", "a", "b", "c"]
    assert [j.number for j in store.pending()] == [0, 1, 3, 5]  # the refused "a" did not overwrite the first
    assert store.count("pending") == 4  # the counts kept by triggers agree
    with pytest.raises(QueueFull):
        add(store, "e")


def test_a_claim_is_a_lease_that_heartbeats_renew(connect: Connect) -> None:
    clock = Clock()
    store = connect(clock=clock)
    for name in ("a", "b"):
        add(store, name)
    job = store.claim("machine-2:41:abcd", lease_s=20)
    assert job is not None and job.worker == "machine-2:41:abcd" and job.lease == pytest.approx(clock.now + 20)
    clock.advance(10)
    assert store.heartbeat("machine-2:41:abcd", lease_s=60) == 1 and store.heartbeat("someone-else", 60) == 0
    clock.advance(25)  # past the first lease, within the renewed one
    assert store.recover() == []  # renewed: a live worker elsewhere keeps its job
    stale = store.claim("machine-3:7:ef01", lease_s=10)
    assert stale is not None and stale.id == "b"
    clock.advance(9.9)
    assert store.recover() == []  # not yet
    clock.advance(0.2)
    [back] = store.recover(cause="its worker stopped renewing its lease")
    assert (back.id, back.state) == ("b", "pending") and [j.id for j in store.running()] == ["a"]
    assert store.get("b") is not None and store.get("b").worker == ""  # type: ignore[union-attr]


def test_a_worker_whose_lease_ran_out_records_nothing_once_another_took_its_job(connect: Connect) -> None:
    clock = Clock()
    store = connect(clock=clock)
    add(store, "a")
    frozen = store.claim("machine-1:1:aaaa", lease_s=10)
    assert frozen is not None
    clock.advance(11)  # it stopped renewing (SIGSTOP, a network split): its job goes to another worker
    assert [job.id for job in store.recover(cause="its worker stopped renewing its lease")] == ["a"]
    taken = store.claim("machine-2:2:bbbb", lease_s=10)
    assert taken is not None and taken.id == "a"
    assert store.holds("a", "machine-2:2:bbbb") and not store.holds("a", "machine-1:1:aaaa")
    # The frozen worker wakes and finishes its stale run: refused, whatever it found.
    store.finish("a", "success", {"outputs": {"9": {"stale": True}}}, worker="machine-1:1:aaaa")
    job = store.get("a")
    assert job is not None and job.state == "running" and job.worker == "machine-2:2:bbbb"
    store.finish("a", "success", {"outputs": {"9": {"fresh": True}}}, worker="machine-2:2:bbbb")
    job = store.get("a")
    assert job is not None and job.state == "success" and job.result["outputs"] == {"9": {"fresh": True}}
    assert not store.holds("a", "machine-2:2:bbbb") and not store.holds("gone", "machine-2:2:bbbb")


def test_recovery_takes_the_jobs_of_dead_processes_on_this_host_only(connect: Connect) -> None:
    import os
    import socket
    import subprocess
    import sys

    from zimage_serve.queue.jobs import worker_id

    store = connect()
    for name in ("mine", "dead", "named"):
        add(store, name)
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = f"{socket.gethostname()}:{int(ended.stdout)}:0000"
    assert store.claim(worker_id(), lease_s=60) is not None  # this live process holds "mine"
    assert store.claim(dead, lease_s=60) is not None  # a finished process held "dead", its lease still valid
    assert store.claim("machine-9:1:aaaa", lease_s=60) is not None
    assert [j.id for j in store.recover()] == ["dead"]
    assert [j.id for j in store.recover(worker="machine-9:1:aaaa")] == ["named"]
    assert [j.id for j in store.running()] == ["mine"] and os.getpid() > 0


def test_finishing_hands_the_next_job_to_the_same_worker(connect: Connect) -> None:
    store = connect()
    for name in ("a", "b"):
        add(store, name)
    assert store.claim("w:1:x") is not None
    following = store.finish("a", "success", {}, claim_next=True, worker="w:1:x", lease_s=5)
    assert following is not None and following.worker == "w:1:x" and store.heartbeat("w:1:x") == 1


def test_owners_narrow_listings_counts_deletes_and_quotas(connect: Connect) -> None:
    store = connect()
    add(store, "local", 1)  # the local operator's (no owner)
    store.enqueue_many([NewJob.of(Job("a1", 2, {}, {}, [], owner="alice", context=JobContext("user", images=2)))])
    store.enqueue_many([NewJob.of(Job("b1", 3, {}, {}, [], owner="bob", context=JobContext("user", images=1)))])
    assert [j.id for j in store.pending()] == ["local", "a1", "b1"]
    assert store.queue_items_json("pending", owner="alice")[0].startswith('[2, "a1"')
    assert store.queue_items_json("pending", owner="") == [] and store.count("pending", "") == 0
    assert store.count("pending", "alice") == 1 and store.count("pending") == 3
    assert store.delete_pending(None, owner="bob") == 1 and store.count("pending") == 2
    assert store.delete_pending(["a1"], owner="bob") == 0 and store.delete_pending(["local"], owner="") == 0
    quota = Quota(max_queued=1, images_per_day=3)
    [refused] = store.enqueue_many(
        [NewJob.of(Job("a2", 4, {}, {}, [], owner="alice", context=JobContext(images=1)), quota)]
    )
    assert isinstance(refused, QuotaExceeded) and refused.quota == "max_queued" and refused.used == 2
    job = store.claim()
    assert job is not None and job.id == "local"
    store.finish("local", "success", {"outputs": {}})
    job = store.claim()
    assert job is not None and job.owner == "alice" and job.context == JobContext("user", images=2)
    assert store.count("running", "alice") == 1 and store.count("running", "bob") == 0
    store.finish("a1", "success", {"outputs": {}})
    [refused] = store.enqueue_many(
        [NewJob.of(Job("a3", 5, {}, {}, [], owner="alice", context=JobContext(images=2)), quota)]
    )
    assert isinstance(refused, QuotaExceeded) and refused.quota == "images_per_day" and refused.retry_after >= 1
    [stored] = store.enqueue_many(
        [NewJob.of(Job("a4", 6, {}, {}, [], owner="alice", context=JobContext(images=1)), quota)]
    )
    assert isinstance(stored, Job) and stored.owner == "alice"
    assert [j.id for j in store.history(owner="alice")] == ["a1"] and store.count_finished("alice") == 1
    assert store.history(owner="bob") == [] and store.count_finished() == 2
    usage = {u["user"]: (u["jobs_today"], u["images_today"], u["queued"]) for u in store.usage()}
    assert usage == {"alice": (2, 3, 1), "bob": (1, 1, 0)}
    assert store.usage(owner="alice") == [
        {"user": "alice", "day": store.usage()[0]["day"], "jobs_today": 2, "images_today": 3, "queued": 1}
    ]
    assert store.delete_history(owner="alice") == 1 and store.count_finished() == 1


def test_images_are_counted_as_made_within_the_allowance_and_given_back_to_their_day(connect: Connect) -> None:
    clock = Clock(start=86400 * 20000 + 3600.0)  # 01:00 UTC on some day
    store = connect(clock=clock)
    quota = Quota(images_per_day=5)
    [stored] = store.enqueue_many(
        [NewJob.of(Job("a1", 1, {}, {}, [], owner="alice", context=JobContext(images=2)), quota)]
    )
    assert isinstance(stored, Job)
    assert store.count_images("alice", 3, allowed=5) is None  # 2 charged at submission, 3 more made: 5
    refused = store.count_images("alice", 1, allowed=5)
    assert isinstance(refused, QuotaExceeded) and refused.used == 6 and refused.allowed == 5
    assert refused.quota == "images_per_day" and 1 <= refused.retry_after <= 23 * 3600
    assert store.count_images("bob", 4, allowed=5) is None  # another owner's day is their own
    yesterday = clock.now
    clock.advance(86400)
    assert store.count_images("alice", 5, allowed=5) is None  # a new day
    assert store.count_images("alice", -2, when=yesterday) is None  # given back to the day charged
    assert store.count_images("alice", -9, when=yesterday) is None  # never below nothing
    today = {u["user"]: u["images_today"] for u in store.usage()}
    before = {u["user"]: u["images_today"] for u in store.usage(day=time.strftime("%Y-%m-%d", time.gmtime(yesterday)))}
    assert today == {"alice": 5} and before == {"alice": 0, "bob": 4}
    assert store.count_images("alice", 1) is None and connect(clock=clock).usage("alice")[0]["images_today"] == 6


def test_a_page_of_jobs_in_some_states_is_read_newest_first_with_their_total(connect: Connect) -> None:
    store = connect()
    store.enqueue_many([NewJob.of(Job(f"j{i}", i, {}, {}, [], owner="alice" if i % 2 else "bob")) for i in range(8)])
    for job_id, state in (("j0", "success"), ("j1", "error"), ("j2", "interrupted"), ("j3", "success")):
        claimed = store.claim()
        assert claimed is not None and claimed.id == job_id
        store.finish(job_id, state, {"outputs": {}})
    assert store.claim() is not None  # j4 runs; j5, j6, j7 wait

    def ids(*states: str, **options: Any) -> tuple[list[str], int]:
        jobs, total = store.jobs_page(states, **options)
        return [job.id for job in jobs], total

    everything = ("pending", "running", "success", "error", "interrupted")
    assert ids(*everything) == ([f"j{i}" for i in reversed(range(8))], 8)
    assert ids(*everything, offset=2, limit=3) == (["j5", "j4", "j3"], 8)
    assert ids(*everything, offset=6, limit=5, newest_first=False) == (["j6", "j7"], 8)
    assert ids("success", "error") == (["j3", "j1", "j0"], 3)  # some of the finished states only
    assert ids("running", "success", limit=1) == (["j4"], 3)
    assert ids(*everything, owner="alice") == (["j7", "j5", "j3", "j1"], 4)
    assert ids("success", "interrupted", owner="bob") == (["j2", "j0"], 2)
    assert ids(*everything, owner="") == ([], 0) and ids() == ([], 0)
    [job], _ = store.jobs_page({"error"})
    assert job.state == "error" and job.owner == "alice" and job.finished is not None


def test_requeue_puts_a_cut_off_job_back_without_counting_its_attempt(connect: Connect) -> None:
    store = connect()
    add(store, "a")
    job = store.claim("w:1:x")
    assert job is not None and job.attempts == 1
    assert store.requeue("a") and not store.requeue("a")
    [back] = store.pending()
    assert (back.id, back.attempts, back.worker, back.started) == ("a", 0, "", None)
    assert store.heartbeat("w:1:x") == 0 and store.count("running") == 0 and store.count("pending") == 1


def test_owners_share_the_workers_fairly_and_keep_their_own_priorities(connect: Connect) -> None:
    store = connect()
    store.enqueue_many([NewJob.of(Job(f"a{i}", i, {}, {}, [], owner="alice")) for i in range(4)])  # alice queues first
    store.enqueue_many([NewJob.of(Job(f"b{i}", 10 + i, {}, {}, [], owner="bob")) for i in range(2)])
    enqueue(store, "local", 20, {}, {}, [])  # the local operator counts as one more owner
    claimed = [store.claim(f"w:{i}:x") for i in range(3)]
    assert [j.id for j in claimed if j] == ["a0", "b0", "local"]  # one each before anyone gets a second
    store.finish("b0", "success", {})
    following = store.claim("w:3:x")  # alice and the local operator run one each, bob none: bob's turn
    assert following is not None and following.id == "b1"
    store.enqueue_many([NewJob.of(Job("a-front", -5, {}, {}, [], owner="alice"))])  # `front` orders alice's own jobs
    following = store.finish("local", "success", {}, claim_next=True, worker="w:2:x")
    assert following is not None and following.id == "a-front"
    assert [j.id for j in store.pending()] == ["a1", "a2", "a3"]


@pytest.mark.parametrize("other", ["alice", "carol", ""])
def test_an_owner_waiting_behind_another_owners_first_job_is_found_whichever_side_of_it(
    connect: Connect, other: str
) -> None:
    """The first waiting job is the next one only when nobody else waits: an owner named before its owner,
    one named after it, and the local operator ("") are each found behind it."""
    store = connect()
    store.enqueue_many([NewJob.of(Job(f"b{i}", i, {}, {}, [], owner="bob")) for i in range(3)])
    assert (first := store.claim("w:1:x")) is not None and first.id == "b0"
    if other:
        store.enqueue_many([NewJob.of(Job("other", 10, {}, {}, [], owner=other))])
    else:
        enqueue(store, "other", 10, {}, {}, [])
    following = store.finish("b0", "success", {}, claim_next=True, worker="w:1:x")
    assert following is not None and following.id == "b1"  # nobody runs: the earlier submission first
    assert (third := store.claim("w:2:x")) is not None and third.id == "other"  # bob runs one already
    assert [j.id for j in store.pending()] == ["b2"]


def test_front_and_numbers_never_jump_another_owners_earlier_job(connect: Connect) -> None:
    """A stream of `front` jobs (or client-chosen low numbers) from one user kept another user's earlier job
    waiting: between owners, the earlier submission goes first when both run as many jobs."""
    store = connect()
    store.enqueue_many(
        [
            NewJob.of(Job("a-running", 0, {}, {}, [], owner="alice")),
            NewJob.of(Job("b-running", 1, {}, {}, [], owner="bob")),
        ]
    )
    claimed = [store.claim("w:1:x"), store.claim("w:2:x")]
    assert {job.id for job in claimed if job} == {"a-running", "b-running"}
    store.enqueue_many([NewJob.of(Job("b-waiting", 5, {}, {}, [], owner="bob"))])
    for turn in range(3):
        store.enqueue_many([NewJob.of(Job(f"a-front{turn}", -1_000_000 - turn, {}, {}, [], owner="alice"))])
    store.finish("a-running", "success", {})
    store.finish("b-running", "success", {})
    assert (first := store.claim("w:1:x")) is not None and first.id == "b-waiting"
    assert (second := store.claim("w:2:x")) is not None and second.id == "a-front2"  # alice's own order holds


def test_each_owner_keeps_their_own_history_and_a_flood_trims_the_flooder(connect: Connect) -> None:
    store = connect(history=HistoryLimits(per_owner=5, total=12))

    def run(owner: str, count: int, first: int = 0) -> None:
        jobs = [NewJob.of(Job(f"{owner}{i}", float(i), {}, {}, [], owner=owner)) for i in range(first, first + count)]
        store.enqueue_many(jobs)
        for _ in range(count):
            job = store.claim()
            assert job is not None
            store.finish(job.id, "success", {})

    def kept(owner: str) -> list[str]:
        return [job.id for job in store.history(owner=owner)]

    run("alice", 3)
    run("bob", 8)  # past his own limit: his oldest go, nobody else's
    assert kept("bob") == ["bob3", "bob4", "bob5", "bob6", "bob7"] and kept("alice") == ["alice0", "alice1", "alice2"]
    assert store.get("bob0") is None and store.count("success") == 8 == store.count_finished()
    run("carol", 2)
    run("dave", 3)  # 13 entries in all, past the total of 12: the largest owner's oldest goes
    assert kept("bob") == ["bob4", "bob5", "bob6", "bob7"]
    assert kept("alice") == ["alice0", "alice1", "alice2"] and kept("carol") == ["carol0", "carol1"]
    assert kept("dave") == ["dave0", "dave1", "dave2"] and store.count_finished() == 12
    # Deleting entries frees their owner's room: the counts behind the trim follow every change.
    assert store.delete_history(["bob4", "bob5"], "bob") == 2
    run("bob", 2, first=8)
    assert kept("bob") == ["bob6", "bob7", "bob8", "bob9"] and store.count_finished() == 12


def test_a_waiting_job_knows_its_place_in_the_queue_and_in_its_owners_share(connect: Connect) -> None:
    store = connect()
    for job_id, owner, number in (("a1", "alice", 1), ("b1", "bob", 2), ("a2", "alice", 3), ("a0", "alice", -1)):
        store.enqueue_many([NewJob.of(Job(job_id, number, {}, {}, [], owner=owner, context=JobContext("user")))])
    assert [store.position(i) for i in ("a0", "a1", "b1", "a2")] == [1, 2, 3, 4]
    assert [store.position(i, "alice") for i in ("a0", "a1", "a2")] == [1, 2, 3]
    assert store.position("b1", "bob") == 1
    assert store.position("missing") is None
    while (claimed := store.claim()) is not None and claimed.id != "a0":  # fair share may pick bob first
        pass
    assert store.position("a0") is None  # running, not waiting
    assert store.position("a1", "alice") == 1 and store.position("a2", "alice") == 2


def test_a_waiting_job_canceled_ends_in_the_history_without_running(connect: Connect) -> None:
    store = connect()
    add(store, "waits")
    add(store, "runs")
    result = {"outputs": {}, "status": {"status_str": "error", "completed": False, "messages": []}}
    assert store.cancel_waiting("waits", result)
    assert not store.cancel_waiting("waits", result)  # once
    job = store.get("waits")
    assert job is not None and job.state == "interrupted" and job.started is None and job.finished is not None
    assert job.result == result
    assert [j.id for j in store.history()] == ["waits"]
    assert store.count("pending") == 1 and store.count("interrupted") == 1
    claimed = store.claim()
    assert claimed is not None and claimed.id == "runs"
    assert not store.cancel_waiting("runs", result)  # running: interrupted by its worker, not here
    assert connect().get("waits") == job
