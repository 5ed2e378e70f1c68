"""Security through the server's routes: tokens (made by the CLI and the admin API), every route × every
kind of caller, isolation of jobs, files and sockets between users, cross-site requests, the allow-list
and trusted proxies."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import WebSocketDenialResponse, WebSocketTestSession

from tests.support.app import PORT, AppServer, serving
from tests.support.cli import run
from tests.support.jobs import (
    done,
    image_of,
    next_event,
    png,
    ready,
    running_ids,
    settle,
    slow_job,
    small_job,
    submit,
    upload,
    view_query,
    wait_until,
)
from tests.support.tokens import make_tokens

CALLERS = ("none", "bad", "revoked", "user", "other", "admin")
Clients = dict[str, AppServer]


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clients]:
    data = tmp_path_factory.mktemp("secured") / "data"
    tokens = make_tokens(data)
    with serving(data, auth="on") as server:
        ready(server)  # its model loaded now, not while another test's server loads one (tests/support/jobs.py)
        yield {who: server.as_token(tokens.get(who)) for who in CALLERS}


@pytest.fixture()
def clients(secured: Clients) -> Clients:
    """The shared server, with nothing left queued or running by the test before."""
    settle(secured["admin"])
    return secured


def token_of(client: AppServer) -> str:
    return client.headers["Authorization"].split()[1]


def test_tokens_are_printed_once_stored_as_hashes_and_revoked_while_the_server_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    code, out, err = run(
        ["tokens", "create", "dana", "--role", "user", "--rpm", "5", "--max-steps", "9", "--data-dir", str(data)],
        capsys,
    )
    assert code == 0, err
    token = out.strip().splitlines()[-1]
    assert token.startswith("zis_") and len(token) > 40
    code, out, err = run(["tokens", "list", "--data-dir", str(data)], capsys)
    assert code == 0 and "dana" in out and token not in out + err
    assert "5" in out and "9" in out
    assert run(["tokens", "create", "dana", "--data-dir", str(data)], capsys)[0] == 2  # taken
    code, _, err = run(["tokens", "create", "../x", "--data-dir", str(data)], capsys)
    assert code == 2 and "NAME" in err
    assert run(["tokens", "create", "eve", "--role", "boss", "--data-dir", str(data)], capsys)[0] == 2
    with serving(data, auth="on", preload=False) as server:  # nothing runs
        dana = server.as_token(token)
        assert dana.json("GET", "/queue")[0] == 200
        code, _, err = run(["tokens", "revoke", "dana", "--data-dir", str(data)], capsys)  # another connection
        assert code == 0, err
        # How soon the server sees it (REFRESH_S) is test_security_units' to check, on a clock of its own.
        wait_until(lambda: dana.json("GET", "/queue")[0] != 200, timeout=30)
        status, answer = dana.json("GET", "/queue")
        assert status == 401 and answer["error"]["type"] == "unauthorized" and "revoked" in answer["error"]["message"]
        code, out, _ = run(["tokens", "list", "--data-dir", str(data)], capsys)
        assert "revoked" in out and "dana" in out
    assert run(["tokens", "revoke", "nobody", "--data-dir", str(data)], capsys)[0] == 2
    for path in data.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), f"{path} holds the token in clear"


def test_the_admin_api_makes_lists_and_revokes_tokens(clients: Clients) -> None:
    assert clients["user"].json("GET", "/api/zimage/tokens")[0] == 403
    assert clients["user"].json("POST", "/api/zimage/tokens", {"name": "x"})[0] == 403
    admin = clients["admin"]
    status, made = admin.json("POST", "/api/zimage/tokens", {"name": "frank", "role": "user", "images_per_day": 4})
    assert status == 201 and made["token"].startswith("zis_") and made["images_per_day"] == 4
    assert admin.json("POST", "/api/zimage/tokens", {"name": "frank"})[0] == 409
    # Checked by the model /openapi.json shows (schemas.TokenRequest): each refusal names its field.
    for body, field in (
        ({"role": "root"}, "role"),
        ({"rpm": "many"}, "rpm"),
        ({"rpm": 0}, "rpm"),
        ({"colour": 1}, "colour"),
    ):
        status, refused = admin.json("POST", "/api/zimage/tokens", {"name": "g", **body})
        assert status == 400 and refused["error"]["details"].startswith(f"{field}: "), refused
    frank = clients["none"].as_token(made["token"])
    assert frank.json("GET", "/queue")[0] == 200
    listed = admin.json("GET", "/api/zimage/tokens")[1]["tokens"]
    assert {t["name"] for t in listed} >= {"alice", "bob", "root", "carol", "frank"}
    assert all("token" not in t and "hash" not in t for t in listed)
    assert admin.json("DELETE", "/api/zimage/tokens/frank")[0] == 200
    assert frank.json("GET", "/queue")[0] == 401
    assert admin.json("DELETE", "/api/zimage/tokens/frank")[0] == 404


# -- authentication -------------------------------------------------------------------------------------------
def test_every_route_needs_a_token_except_health(clients: Clients) -> None:
    """The matrix: each route for each kind of caller, with the status each must get."""
    alice_job = submit(clients["user"], small_job("matrix"))
    entry = done(clients["user"], alice_job)
    image = image_of(entry)
    other_job = submit(clients["other"], small_job("bobs"))
    done(clients["other"], other_job)
    reads = [
        "/prompt",
        "/queue",
        "/history",
        "/object_info",
        "/object_info/KSampler",
        "/models",
        "/models/checkpoints",
        "/embeddings",
        "/extensions",
        "/features",
        "/system_stats",
        "/v1/models",
        "/api/zimage/usage",
        "/openapi.json",
        "/docs",
        "/api/queue",
    ]
    refused = {"none": 401, "bad": 401, "revoked": 401}
    for path in reads:
        for who in CALLERS:
            status = clients[who].request("GET", path)[0]
            assert status == refused.get(who, 200), (path, who, status)
    for who in CALLERS:
        assert clients[who].request("GET", "/health")[0] in (200, 503), who
    health = clients["none"].json("GET", "/health")[1]
    assert set(health) == {"status", "worker"}  # nothing but whether it is up
    # Files: the owner reads their image, another user gets 404, the admin reaches it through the history
    # entry it sees (the user's folder named in the subfolder).
    expected_view = {"none": 401, "bad": 401, "revoked": 401, "user": 200, "other": 404, "admin": 404}
    for who in CALLERS:
        assert clients[who].request("GET", view_query(image))[0] == expected_view[who], who
    admin_image = image_of(clients["admin"].json("GET", f"/history/{alice_job}")[1][alice_job])
    assert admin_image["subfolder"] == "users/alice"
    assert clients["admin"].request("GET", view_query(admin_image))[0] == 200
    # The token may also come as a query parameter on /view (browsers' <img>), or as HTTP Basic.
    token = token_of(clients["user"])
    assert clients["none"].request("GET", view_query(image) + "&token=" + token)[0] == 200
    assert clients["none"].request("GET", "/queue?token=" + token)[0] == 401  # only where headers cannot go
    basic = {"Authorization": "Basic " + base64.b64encode(f"x:{token}".encode()).decode()}
    assert clients["none"].request("GET", "/queue", headers=basic)[0] == 200
    bare = {"Authorization": "Basic " + base64.b64encode(f"{token}:".encode()).decode()}
    assert clients["none"].request("GET", "/queue", headers=bare)[0] == 200
    assert clients["none"].request("GET", "/queue", headers={"Authorization": "Basic !!!"})[0] == 401
    # State-changing routes (the OpenAI one first: it answers once its image is made, queued behind nothing).
    writes: list[tuple[str, Any]] = [
        ("/v1/images/generations", {"prompt": "a red circle", "size": "64x64"}),
        ("/prompt", {"prompt": small_job("w")}),
        ("/queue", {"delete": ["nothing"]}),
        ("/history", {"delete": ["nothing"]}),
        ("/interrupt", {}),
    ]
    for path, body in writes:
        for who in CALLERS:
            status = clients[who].request("POST", path, body)[0]
            assert status == refused.get(who, 200), (path, who, status)
    for who in CALLERS:
        status = clients[who].request("POST", "/free", {"unload_models": True})[0]
        assert status == {**refused, "user": 403, "other": 403, "admin": 200}[who], who
    status, answer = clients["bad"].json("GET", "/queue")
    assert answer == {
        "error": {
            "type": "unauthorized",
            "message": "the token is not valid",
            "details": "the token is not valid",
            "extra_info": {},
        },
        "node_errors": {},
    }
    assert clients["none"].request("GET", "/queue")[1]["www-authenticate"].startswith("Bearer")


def read_until(socket: WebSocketTestSession, stop: Any) -> list[dict[str, Any]]:
    """Messages up to and including the first for which `stop(message)` is true."""
    messages = [next_event(socket)]
    while not stop(messages[-1]):
        messages.append(next_event(socket))
    return messages


def test_websockets_need_a_token_and_a_client_id_is_its_users_own(clients: Clients) -> None:
    anyone = clients["none"]
    with pytest.raises(WebSocketDenialResponse) as refused, anyone.websocket("/ws?clientId=shared"):
        pass
    assert refused.value.status_code == 401
    with (
        anyone.websocket(f"/ws?clientId=shared&token={token_of(clients['user'])}") as alice,
        clients["other"].websocket("/ws?clientId=bob-2") as bob_header,
        anyone.websocket(f"/ws?clientId=shared&token={token_of(clients['other'])}") as bob,
    ):
        for socket in (alice, bob, bob_header):
            assert next_event(socket)["type"] == "status"
        job = submit(clients["user"], small_job("ws-alice", seed=7), client_id="shared")
        seen = read_until(alice, lambda m: m["type"] == "executing" and m["data"]["node"] is None)
        assert seen[-1]["data"]["prompt_id"] == job
        assert {"execution_start", "executed"} <= {m["type"] for m in seen}
        done(clients["user"], job)
        # The hub sends every message in the order it was published: whatever reached Bob's sockets about
        # Alice's job came before this marker.
        anyone.runtime.hub.broadcast("marker", {})
        for socket in (bob, bob_header):  # the same clientId or not, another user: only broadcast status
            before = read_until(socket, lambda m: m["type"] == "marker")[:-1]
            assert all(m["type"] == "status" for m in before), before


def test_status_messages_count_only_the_users_own_prompts(clients: Clients) -> None:
    alice, bob, admin = clients["user"], clients["other"], clients["admin"]
    with alice.websocket("/ws?clientId=a") as alices, bob.websocket("/ws?clientId=b") as bobs:
        for socket in (alices, bobs):
            assert next_event(socket)["data"]["status"]["exec_info"]["queue_remaining"] == 0
        blocker = submit(alice, slow_job("status-blocker"))
        read_until(alices, lambda m: m["type"] == "status" and m["data"]["status"]["exec_info"]["queue_remaining"])
        alice.request("POST", "/interrupt", {})
        done(alice, blocker)
        admin.runtime.hub.broadcast("marker", {})
        seen = [m for m in read_until(bobs, lambda m: m["type"] == "marker") if m["type"] == "status"]
        assert seen and all(m["data"]["status"]["exec_info"]["queue_remaining"] == 0 for m in seen)


# -- isolation --------------------------------------------------------------------------------------------
def test_users_see_and_change_only_their_own_jobs(clients: Clients) -> None:
    alice, bob, admin = clients["user"], clients["other"], clients["admin"]
    blocker = submit(alice, slow_job("iso-blocker"))
    wait_until(lambda: running_ids(alice) == [blocker])
    waiting = submit(alice, small_job("iso-waiting"))
    bobs = submit(bob, small_job("iso-bob"))
    alice_queue = alice.json("GET", "/queue")[1]
    bob_queue = bob.json("GET", "/queue")[1]
    admin_queue = admin.json("GET", "/queue")[1]
    # How busy the queue is, each as far as it is theirs: nobody learns how much others have queued.
    remaining = [c.json("GET", "/prompt")[1]["exec_info"]["queue_remaining"] for c in (alice, bob, admin)]
    assert remaining == [2, 1, 3]
    assert {i[1] for i in alice_queue["queue_pending"]} == {waiting}
    assert {i[1] for i in bob_queue["queue_pending"]} == {bobs} and bob_queue["queue_running"] == []
    assert {i[1] for i in admin_queue["queue_pending"]} == {waiting, bobs}
    assert bob.json("GET", "/queue?limit=10")[1]["pagination"]["total"] == 1
    # Bob cannot delete, clear or interrupt Alice's jobs.
    assert bob.request("POST", "/queue", {"delete": [waiting]})[0] == 200
    assert bob.request("POST", "/queue", {"clear": True})[0] == 200
    assert bob.request("POST", "/interrupt", {"prompt_id": blocker})[0] == 200
    assert bob.request("POST", "/interrupt", {})[0] == 200
    queue = alice.json("GET", "/queue")[1]
    assert [i[1] for i in queue["queue_running"]] == [blocker] and [i[1] for i in queue["queue_pending"]] == [waiting]
    assert bob.json("GET", "/queue")[1]["queue_pending"] == []  # his own clear did remove his own
    # Alice interrupts her own; the admin may clear anyone's.
    assert alice.request("POST", "/interrupt", {})[0] == 200
    assert done(alice, blocker)["status"]["status_str"] == "error"
    assert done(alice, waiting)["status"]["completed"]
    assert bob.json("GET", f"/history/{waiting}")[1] == {}
    assert waiting not in bob.json("GET", "/history")[1]
    assert waiting in admin.json("GET", "/history")[1]
    assert bob.request("POST", "/history", {"delete": [waiting]})[0] == 200
    assert bob.request("POST", "/history", {"clear": True})[0] == 200
    assert waiting in alice.json("GET", "/history")[1]
    assert alice.request("POST", "/history", {"delete": [waiting]})[0] == 200
    assert alice.json("GET", f"/history/{waiting}")[1] == {}


def test_uploads_and_outputs_are_their_users_own(clients: Clients) -> None:
    alice, bob, admin = clients["user"], clients["other"], clients["admin"]
    data = alice.data_dir
    status, stored = upload(alice, png(colour="blue"), "mine.png")
    assert status == 200 and stored == {"name": "mine.png", "subfolder": "", "type": "input"}
    assert (data / "input" / "users" / "alice" / "mine.png").is_file()
    assert alice.request("GET", "/view?filename=mine.png&type=input")[0] == 200
    assert bob.request("GET", "/view?filename=mine.png&type=input")[0] == 404
    assert admin.request("GET", "/view?filename=mine.png&type=input&subfolder=users/alice")[0] == 200
    listed = alice.json("GET", "/object_info/LoadImage")[1]["LoadImage"]["input"]["required"]["image"][0]
    assert "mine.png" in listed
    assert "mine.png" not in bob.json("GET", "/object_info/LoadImage")[1]["LoadImage"]["input"]["required"]["image"][0]
    graph = small_job("reads")
    graph["20"] = {"class_type": "LoadImage", "inputs": {"image": "mine.png"}}
    graph["21"] = {"class_type": "SaveImage", "inputs": {"images": ["20", 0], "filename_prefix": "copy"}}
    status, answer = bob.json("POST", "/prompt", {"prompt": graph})  # runs its other output, not this one
    assert status == 200 and answer["node_errors"]["20"]["errors"][0]["type"] == "custom_validation_failed"
    job = submit(alice, graph)
    assert done(alice, job)["status"]["completed"]
    # The same graph from another user never shares the first one's saved files (its cache is per owner).
    status, _ = upload(bob, png(colour="blue"), "mine.png")
    assert status == 200
    bobs = submit(bob, graph)
    bob_images = [i for ui in done(bob, bobs)["outputs"].values() for i in ui["images"]]
    assert len(bob_images) == 2 and all(bob.request("GET", view_query(i))[0] == 200 for i in bob_images)
    for image in bob_images:  # written again for him, in his own folder, not handed Alice's from the cache
        assert (data / "output" / "users" / "bob" / image["subfolder"] / image["filename"]).is_file()
    # Escapes are refused, whatever the space.
    assert bob.request("GET", "/view?filename=mine.png&type=input&subfolder=../alice")[0] == 403
    assert bob.request("GET", "/view?filename=x.png&subfolder=../../../output")[0] == 403


def test_the_openai_route_is_isolated_and_its_urls_come_from_the_public_url(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tokens = make_tokens(data)
    with serving(data, auth="on", security={"public_url": "https://images.example.com/base"}) as server:
        alice, bob = server.as_token(tokens["user"]), server.as_token(tokens["other"])
        status, _, body = alice.request(
            "POST", "/v1/images/generations", {"prompt": "a red circle", "size": "64x64"}, headers={"Host": "127.0.0.1"}
        )
        assert status == 200, body
        url = json.loads(body)["data"][0]["url"]
        assert url.startswith("https://images.example.com/base/view?")
        query = url.split("/view", 1)[1]
        assert alice.request("GET", "/view" + query)[0] == 200
        assert bob.request("GET", "/view" + query)[0] == 404
        status, _, body = alice.request(
            "POST", "/v1/images/generations", {"prompt": "x", "size": "64x64", "response_format": "b64_json"}
        )
        assert status == 200 and json.loads(body)["data"][0]["b64_json"]
        headers = {"Host": "attacker.example"}
        assert server.request("POST", "/v1/images/generations", {"prompt": "x"}, headers=headers)[0] == 403


# -- cross-site requests and the network ---------------------------------------------------------------------
def test_pages_of_other_sites_cannot_submit_even_with_auth_off(tmp_path: Path) -> None:
    with serving(tmp_path / "data", security={"allow_origin": ("https://app.example.com",)}) as server:
        body = {"prompt": small_job("csrf")}
        for headers in (
            {"Origin": "http://evil.example"},
            {"Origin": "http://127.0.0.1.evil.example"},
            {"Origin": "null"},
            {"Sec-Fetch-Site": "cross-site"},
            {"Origin": f"http://127.0.0.1:{PORT + 1}"},
            {"Origin": "http://localhost", "Host": f"localhost:{PORT}"},  # a page on port 80, not ours
            {"Host": "rebound.example", "Origin": "http://rebound.example"},
        ):
            status, _, answer = server.request("POST", "/prompt", body, headers=headers)
            assert status == 403, headers
            assert json.loads(answer)["error"]["type"] == "cross_site_request"
            assert server.request("POST", "/queue", {"clear": True}, headers=headers)[0] == 403
        for headers in (
            {},
            {"Origin": f"http://127.0.0.1:{PORT}"},
            {"Origin": "https://app.example.com"},
            {"Sec-Fetch-Site": "same-origin"},
        ):
            status, _, answer = server.request("POST", "/prompt", body, headers=headers)
            assert status == 200, (headers, answer)
        assert server.request("OPTIONS", "/prompt", headers={"Origin": "https://app.example.com"})[0] == 200
        with (
            pytest.raises(WebSocketDenialResponse) as refused,
            server.websocket("/ws", headers={"Origin": "http://evil.example"}),
        ):
            pass
        assert refused.value.status_code == 403
        settle(server)  # the prompts let through need not run


def test_the_allow_list_and_trusted_proxies(tmp_path: Path) -> None:
    data = tmp_path / "data"
    allowed = {"allow_ip": ("10.0.0.0/8", "2001:db8::/32")}
    with serving(data, security=allowed, preload=False) as server:  # nothing runs
        for path in ("/health", "/queue", "/view?filename=x.png"):
            status, _, answer = server.request("GET", path)
            assert status == 403 and json.loads(answer)["error"]["type"] == "address_not_allowed", path
        assert server.request("POST", "/prompt", {"prompt": small_job("no")})[0] == 403
        spoofed = {"X-Forwarded-For": "10.1.2.3"}  # believed only from a trusted proxy
        assert server.request("GET", "/queue", headers=spoofed)[0] == 403
    for address in ("10.1.2.3", "2001:db8::7"):
        with serving(data, security=allowed, client=address, preload=False) as server:
            assert server.request("GET", "/queue")[0] == 200, address
    with serving(data, security={**allowed, "trusted_proxy": ("127.0.0.1/32",)}, preload=False) as server:
        assert server.request("GET", "/queue", headers={"X-Forwarded-For": "10.1.2.3"})[0] == 200
        assert server.request("GET", "/queue", headers={"X-Forwarded-For": "2001:db8::7"})[0] == 200
        assert server.request("GET", "/queue", headers={"X-Forwarded-For": "10.1.2.3, 192.0.2.1"})[0] == 403
        assert server.request("GET", "/queue", headers={"X-Forwarded-For": "192.0.2.1, 10.1.2.3"})[0] == 200
        assert server.request("GET", "/queue", headers={"X-Forwarded-For": "not-an-address"})[0] == 403
        assert server.request("GET", "/queue")[0] == 403  # the proxy itself is not on the list
