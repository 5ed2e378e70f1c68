"""The records contract (`records/contract.Records`: idempotency keys and asset records), run against both
implementations; "reopened" is a new connection, as a restarted process makes."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.redis_server import RedisServer
from tests.support.queues import Clock
from zimage_serve.queue.redis_queue import RedisQueue
from zimage_serve.records.contract import Asset, Place, Records, output_asset_id
from zimage_serve.records.redis_records import RedisRecords
from zimage_serve.records.sqlite_records import SQLiteRecords

Connect = Callable[[Clock], Records]


def sqlite_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Connect:
    return lambda clock: SQLiteRecords(tmp_path / "records.sqlite3", clock=clock)


def redis_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Connect:
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix = f"test-{uuid.uuid4().hex[:12]}:"
    # Redis expires keys by its own clock: the queue's clock is only for the records' own times.
    return lambda clock: RedisRecords(RedisQueue(server.url, prefix=prefix, clock=clock))


BACKENDS = {"sqlite": sqlite_backend, "redis": redis_backend}


@pytest.fixture(params=sorted(BACKENDS))
def connect(request: pytest.FixtureRequest, tmp_path: Path) -> Connect:
    return BACKENDS[request.param](request, tmp_path)


def upload(owner: str, digest: str, name: str = "photo.png", expires: float | None = None) -> Asset:
    return Asset(
        id=str(uuid.uuid4()),
        owner=owner,
        place=Place("input", "assets", f"{digest}.png"),
        size=10,
        content_type="image/png",
        created=1000.0,
        hash=f"blake3:{digest}",
        file_path=name,
        expires=expires,
        tags=("input",),
    )


def test_a_key_is_claimed_once_per_owner_until_released(connect: Connect) -> None:
    records = connect(Clock())
    assert records.claim_key("alice", "k1")
    assert not records.claim_key("alice", "k1")
    assert records.claim_key("bob", "k1")  # another owner's key of the same text is theirs
    records.release_key("alice", "k1")
    assert records.claim_key("alice", "k1")
    reopened = connect(Clock())
    assert not reopened.claim_key("alice", "k1")  # the claim is kept, not in one connection's memory


def test_a_key_can_be_claimed_again_once_it_expires(connect: Connect, request: pytest.FixtureRequest) -> None:
    clock = Clock()
    records = connect(clock)
    assert records.claim_key("alice", "short", ttl_s=0.05)
    assert not records.claim_key("alice", "short", ttl_s=60)
    if request.node.callspec.params["connect"] == "sqlite":
        clock.advance(1)
        assert records.claim_key("alice", "short")
        return
    deadline = time.monotonic() + 5  # Redis expires keys by its own clock, in real time
    while not records.claim_key("alice", "short", ttl_s=60):
        assert time.monotonic() < deadline, "the key never expired"
        time.sleep(0.01)


def test_an_asset_is_recorded_once_and_read_back_by_any_connection(connect: Connect) -> None:
    records = connect(Clock())
    asset = upload("alice", "ab" * 32)
    assert records.add_asset(asset) == asset
    changed = Asset(**{**asset.__dict__, "size": 99})
    assert records.add_asset(changed) == asset  # an id already recorded keeps its record
    assert connect(Clock()).asset(asset.id) == asset
    assert records.asset(str(uuid.uuid4())) is None


def test_uploads_are_found_by_hash_only_for_their_owner(connect: Connect) -> None:
    records = connect(Clock())
    digest = "cd" * 32
    first = records.add_asset(upload("alice", digest))
    assert records.with_hash("alice", f"blake3:{digest}") == first
    assert records.with_hash("bob", f"blake3:{digest}") is None
    assert records.with_hash("alice", "blake3:" + "00" * 32) is None


def test_deleting_the_last_record_over_a_file_says_so(connect: Connect) -> None:
    records = connect(Clock())
    digest = "ef" * 32
    one, two = records.add_asset(upload("alice", digest)), records.add_asset(upload("alice", digest, "b.png"))
    found = records.delete_asset(one.id)
    assert found is not None and found[0] == one and found[1] is False  # `two` still holds the file
    assert records.delete_asset(one.id) is None
    assert records.with_hash("alice", f"blake3:{digest}") == two
    found = records.delete_asset(two.id)
    assert found is not None and found[1] is True
    assert records.with_hash("alice", f"blake3:{digest}") is None


def test_outputs_get_stable_ids_and_a_hash_once_known(connect: Connect) -> None:
    records = connect(Clock())
    asset_id = output_asset_id("job-1", "output", "", "ComfyUI_00001_.png")
    assert asset_id == output_asset_id("job-1", "output", "", "ComfyUI_00001_.png")
    assert asset_id != output_asset_id("job-2", "output", "", "ComfyUI_00001_.png")
    uuid.UUID(asset_id)
    output = Asset(
        id=asset_id,
        owner="alice",
        place=Place("output", "", "ComfyUI_00001_.png"),
        size=5,
        content_type="image/png",
        created=1.0,
        job_id="job-1",
        node_id="9",
    )
    records.add_asset(output)
    records.set_hash(asset_id, "blake3:" + "12" * 32)
    found = records.asset(asset_id)
    assert found is not None and found.hash == "blake3:" + "12" * 32
    # Outputs are never offered as upload bytes to mint from.
    assert records.with_hash("alice", "blake3:" + "12" * 32) is None


def test_expired_assets_are_listed_oldest_first(connect: Connect) -> None:
    records = connect(Clock())
    late = records.add_asset(upload("alice", "aa" * 32, expires=2000.0))
    early = records.add_asset(upload("alice", "bb" * 32, expires=1500.0))
    records.add_asset(upload("alice", "cc" * 32))  # never expires
    assert records.expired_assets(1000.0) == []
    assert records.expired_assets(1600.0) == [early]
    assert records.expired_assets(5000.0) == [early, late]
    assert records.expired_assets(5000.0, limit=1) == [early]


def test_a_file_shared_by_two_owners_stays_until_the_last_record_over_it(connect: Connect) -> None:
    records = connect(Clock())
    # Admins keep their uploads in the shared folders: the same bytes are one file for both.
    place = Place("input", "assets", "ab.png", "")
    first = records.add_asset(Asset(str(uuid.uuid4()), "root", place, 3, "image/png", 1.0, "blake3:" + "ab" * 32))
    second = records.add_asset(Asset(str(uuid.uuid4()), "root2", place, 3, "image/png", 1.0, "blake3:" + "ab" * 32))
    found = records.delete_asset(first.id)
    assert found is not None and found[1] is False
    found = records.delete_asset(second.id)
    assert found is not None and found[1] is True


def test_the_outputs_of_jobs_that_are_gone_are_forgotten(connect: Connect) -> None:
    records = connect(Clock())
    ids = []
    for job in ("j1", "j1", "j2"):
        asset_id = output_asset_id(job, "output", "", f"{len(ids)}.png")
        ids.append(asset_id)
        place = Place("output", "", f"{len(ids)}.png", "alice")
        records.add_asset(Asset(asset_id, "alice", place, 1, "image/png", 1.0, job_id=job, node_id="9"))
    assert records.forget_outputs(["j1", "missing"]) == 2
    assert [records.asset(i) is None for i in ids] == [True, True, False]
    assert records.forget_outputs([]) == 0
