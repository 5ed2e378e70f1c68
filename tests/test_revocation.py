"""Revoking a token stops its work: its waiting jobs are deleted and its running one interrupted, whether
it is revoked over the API or on the command line of the same machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.app import serving
from tests.support.jobs import history, running_ids, running_job, slow_job, submit, wait_until
from tests.support.tokens import make_tokens
from zimage_serve.security.audit_verify import records
from zimage_serve.security.tokens import TokenStore


@pytest.mark.parametrize("where", ["api", "command line"])
def test_a_revoked_users_waiting_jobs_are_deleted_and_its_running_one_stopped(tmp_path: Path, where: str) -> None:
    data = tmp_path / "data"
    tokens = make_tokens(data)
    with serving(data, auth="on") as server:
        alice, admin = server.as_token(tokens["user"]), server.as_token(tokens["admin"])
        running = submit(alice, slow_job("alice-running"))
        wait_until(lambda: running_ids(admin) == [running])
        waiting = [submit(alice, running_job(f"alice-waiting{i}")) for i in range(3)]
        if where == "api":
            assert admin.request("DELETE", "/api/zimage/tokens/alice")[0] == 200
        else:
            TokenStore(data / "auth.sqlite3").revoke("alice")  # what `zimage tokens revoke alice` does
        wait_until(lambda: running in history(admin))
        messages = [event for event, _ in history(admin)[running]["status"]["messages"]]
        assert "execution_interrupted" in messages
        queue = admin.json("GET", "/queue")[1]
        assert queue["queue_pending"] == [] and queue["queue_running"] == []
        assert not set(waiting) & set(history(admin))  # deleted, never run
    revocations = [r for r in records(data / "audit") if r["kind"] == "revocation"]
    assert [(r["user"], r["deleted"], r["interrupted"]) for r in revocations] == [("alice", 3, True)]
