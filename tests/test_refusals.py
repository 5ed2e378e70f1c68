"""Requests refused before anyone is identified are counted per address, reason and minute: a client
without a token cannot fill the disk through the audit log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.support.app import serving
from tests.support.queues import Clock
from tests.support.tokens import make_tokens
from zimage_serve.security.audit_verify import records
from zimage_serve.security.refusals import ADDRESSES_KEPT, ROUTE_CHARS, RefusalTally


def test_a_flood_from_one_address_is_one_record_a_minute() -> None:
    written: list[dict[str, Any]] = []
    clock = Clock(1_000_030.0)  # half a minute into 13:47
    tally = RefusalTally(written.append, clock=clock)
    for i in range(2000):
        tally.note("203.0.113.7", "unauthorized", 401, "GET", f"/{i % 7}" + "x" * 5000)
    tally.flush_due()
    assert written == []  # the minute is not over
    clock.advance(60)
    tally.note("203.0.113.7", "unauthorized", 401, "GET", "/next-minute")
    [summary] = written
    assert summary["kind"] == "refusals" and summary["count"] == 2000 and summary["address"] == "203.0.113.7"
    assert summary["time"] == "1970-01-12T13:47:00.000Z"  # the start of the minute it counts
    assert len(summary["routes"]) == 5 and all(len(r) <= len("GET ") + ROUTE_CHARS + 1 for r in summary["routes"])
    tally.flush()
    assert [r["routes"] for r in written[1:]] == [["GET /next-minute"]]


def test_addresses_past_the_bound_are_counted_together() -> None:
    written: list[dict[str, Any]] = []
    tally = RefusalTally(written.append, clock=Clock(0.0))
    for i in range(ADDRESSES_KEPT + 500):
        tally.note(f"10.0.{i // 256}.{i % 256}", "unauthorized", 401, "GET", "/queue")
    tally.flush()
    assert len(written) == ADDRESSES_KEPT + 1
    assert [r["count"] for r in written if r["address"] == "*"] == [500]


def test_unauthenticated_requests_add_a_summary_not_a_record_each(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tokens = make_tokens(data)
    long_path = "/" + "a" * 4000
    with serving(data, auth="on", preload=False) as server:
        for _ in range(300):
            assert server.request("GET", long_path)[0] == 401
        assert server.as_token(tokens["bad"]).request("GET", "/queue")[0] == 401
        assert server.as_token(tokens["revoked"]).request("GET", "/queue")[0] == 401
    found = list(records(data / "audit"))
    summaries = {r["reason"] + (" " + r["routes"][0][:10]): r for r in found if r["kind"] == "refusals"}
    assert sum(r["count"] for r in summaries.values()) == 301  # the flood and the unknown token
    assert max(len(r["routes"][0]) for r in summaries.values()) <= len("GET ") + ROUTE_CHARS + 1
    # A known user's refusal is theirs, and recorded as such.
    assert [r["user"] for r in found if r["kind"] == "request" and r["outcome"] == "refused"] == ["carol"]
    size = sum(p.stat().st_size for p in (data / "audit").iterdir())
    assert size < 20_000, size  # 300 requests with 4 KB paths each were 1.2 MB of records
