"""Revoking a token stops its work: its waiting jobs are deleted and its running one interrupted, whether
it is revoked over the API or on the command line of the same machine. A new token under the revoked
name is a new user, unless the admin says it continues the old one."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.app import AppServer, serving
from tests.support.jobs import (
    done,
    history,
    image_of,
    running_ids,
    running_job,
    slow_job,
    small_job,
    submit,
    view_query,
    wait_until,
)
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


def test_a_new_token_under_a_revoked_name_inherits_nothing_unless_the_admin_says_so(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tokens = make_tokens(data)
    with serving(data, auth="on") as server:
        admin = server.as_token(tokens["admin"])
        first = server.as_token(tokens["user"])
        image = image_of(done(first, submit(first, small_job("alice-first"))))
        assert first.request("POST", "/userdata/workflows%2Fa.json", raw=b"{}")[0] == 200
        template = {"name": "mine", "workflow": small_job("mine")}
        assert first.json("POST", "/api/zimage/templates", template)[0] == 201

        def token_for(body: dict[str, object]) -> AppServer:
            assert admin.request("DELETE", "/api/zimage/tokens/alice")[0] == 200
            status, made = admin.json("POST", "/api/zimage/tokens", {"name": "alice", **body})
            assert status == 201, made
            return server.as_token(made["token"])

        def sees_the_first_users_things(user: AppServer) -> bool:
            found = [
                user.request("GET", view_query(image))[0] == 200,
                len(history(user)) == 1,
                user.json("GET", "/userdata?dir=workflows")[1] == ["a.json"],
                "mine" in {t["name"] for t in user.json("GET", "/api/zimage/templates")[1]["templates"]},
            ]
            assert len(set(found)) == 1, found  # all of them, or none
            return found[0]

        continued = token_for({"inherit": True})
        assert sees_the_first_users_things(continued)
        assert continued.json("GET", "/api/zimage/usage")[1]["user"] == "alice"

        fresh = token_for({})
        assert not sees_the_first_users_things(fresh)
        assert fresh.request("GET", view_query(image))[0] == 404
        assert fresh.json("GET", "/api/zimage/usage")[1]["user"] == "alice~2"
        assert fresh.json("GET", "/api/zimage/session")[1]["user"] == "alice"
        mine = image_of(done(fresh, submit(fresh, small_job("alice-second"))))
        assert mine["subfolder"] == "" and fresh.request("GET", view_query(mine))[0] == 200
        users = {row["user"]: row for row in admin.json("GET", "/api/zimage/usage")[1]["users"]}
        assert users["alice"]["jobs_today"] == 1 and users["alice~2"]["jobs_today"] == 1
        assert users["alice~2"]["name"] == "alice" and users["alice"]["name"] is None

        status, refused = admin.json("POST", "/api/zimage/tokens", {"name": "dave", "inherit": True})
        assert status == 400 and "no earlier token named 'dave'" in refused["error"]["details"]
