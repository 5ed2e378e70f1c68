"""Signing out: the pages show a sign-out button to a browser signed in with a session (the /simple page and
the sign-in page), POST /logout closes the session on the server and clears the cookie, and another site's
page cannot sign anyone out. Labels fit on one line in both languages."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest
from starlette.testclient import TestClient

from tests.browser import browser_page
from tests.support.app import serving
from tests.support.threaded import threaded_server
from tests.support.tokens import make_tokens
from zimage_serve.server.gate import SESSION_COOKIE

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def sign_in(client: TestClient, token: str) -> str:
    answer = client.post("/login", content=f"token={token}&next=/simple", headers=FORM, follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/simple", answer.text
    secret = client.cookies.get(SESSION_COOKIE)
    assert secret
    return secret


def test_sign_out_closes_the_session_and_only_from_this_site(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tokens = make_tokens(data)
    with serving(data, auth="on", preload=False) as server:
        client, origin = server.client, server.url
        secret = sign_in(client, tokens["user"])
        assert client.get("/api/zimage/session").json() == {"user": "alice", "role": "user", "signed_in": True}
        page = client.get("/login?next=/simple").text  # the sign-in page knows who is signed in here
        assert 'id="signed-in"' in page and "<b>alice</b>" in page and 'action="logout"' in page
        # Another site's page cannot sign anyone out (its Origin, or the browser's Sec-Fetch-Site).
        for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
            assert client.post("/logout", content="next=/simple", headers={**FORM, **headers}).status_code == 403
            assert client.get("/api/zimage/session").json()["signed_in"] is True
        answer = client.post(
            "/logout", content="next=/simple", headers={**FORM, "Origin": origin}, follow_redirects=False
        )
        assert answer.status_code == 303 and answer.headers["location"] == "/login?next=" + quote("/simple", safe="")
        assert f"{SESSION_COOKIE}=" in answer.headers["set-cookie"] and "Max-Age=0" in answer.headers["set-cookie"]
        assert client.cookies.get(SESSION_COOKIE) is None
        assert 'id="signed-in"' not in client.get("/login").text
        # The session is closed on the server, not only forgotten by this browser.
        client.cookies.set(SESSION_COOKIE, secret)
        assert client.get("/api/zimage/session").status_code == 401


def use_cookie(client: TestClient, secret: str) -> None:
    client.cookies.clear()  # one session cookie, as a browser holds for this site
    client.cookies.set(SESSION_COOKIE, secret)


def test_a_users_sessions_are_listed_and_ended_one_or_all_and_only_their_own(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tokens = make_tokens(data)
    with serving(data, auth="on", preload=False) as server:
        client = server.client
        laptop = sign_in(client, tokens["user"])
        phone = sign_in(client, tokens["user"])  # the same person, another browser (the cookie is the last)
        sign_in(client, tokens["other"])
        alice, bob, admin = (server.as_token(tokens[who]) for who in ("user", "other", "admin"))
        listed = alice.json("GET", "/api/zimage/sessions")[1]["sessions"]
        assert [entry["user"] for entry in listed] == ["alice", "alice"]  # hers only, newest first
        assert all(entry["expires"] > entry["created"] and not entry["current"] for entry in listed)
        assert len(admin.json("GET", "/api/zimage/sessions")[1]["sessions"]) == 3
        assert [e["user"] for e in admin.json("GET", "/api/zimage/sessions?user=bob")[1]["sessions"]] == ["bob"]
        # The one this browser holds is marked as such.
        use_cookie(client, phone)
        marked = client.get("/api/zimage/sessions").json()["sessions"]
        assert [e["current"] for e in marked] == [True, False]
        # Ending the laptop's session signs the laptop out, and nobody else; Bob cannot end Alice's.
        laptop_id = marked[1]["id"]
        assert bob.request("DELETE", f"/api/zimage/sessions/{laptop_id}")[0] == 404
        assert alice.json("DELETE", f"/api/zimage/sessions/{laptop_id}") == (200, {"ended": 1})
        use_cookie(client, laptop)
        assert client.get("/api/zimage/session").status_code == 401
        use_cookie(client, phone)
        assert client.get("/api/zimage/session").json()["signed_in"] is True
        # Signing out everywhere: every session of hers, none of Bob's.
        assert alice.json("DELETE", "/api/zimage/sessions") == (200, {"ended": 1})
        assert client.get("/api/zimage/session").status_code == 401
        assert [e["user"] for e in admin.json("GET", "/api/zimage/sessions")[1]["sessions"]] == ["bob"]


def test_only_a_browser_session_gets_a_sign_out_button(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tokens = make_tokens(data)
    with serving(data, auth="on", preload=False) as server:
        bearer = {"Authorization": f"Bearer {tokens['user']}"}
        assert server.client.get("/api/zimage/session", headers=bearer).json()["signed_in"] is False
    with serving(tmp_path / "open", preload=False) as server:
        assert server.client.get("/api/zimage/session").json()["signed_in"] is False
        assert 'id="signed-in"' not in server.client.get("/login").text


@pytest.mark.parametrize("locale", ["zh-CN", "en-US"])
def test_the_pages_sign_out_button_and_labels_on_one_line(tmp_path: Path, locale: str) -> None:
    data = tmp_path / "data"
    tokens = make_tokens(data)
    with threaded_server(data, auth="on") as server, browser_page(locale) as watched:
        page = watched.page
        page.goto(server.url + "/simple", wait_until="networkidle")
        page.fill("#token", tokens["user"])
        page.click("button[type=submit]")
        page.wait_for_url("**/simple")
        sign_out = page.locator("#sign-out button")
        sign_out.wait_for(state="visible")
        assert sign_out.inner_text() == ("退出登录" if locale == "zh-CN" else "Sign out")
        assert page.inner_text("#user") == "alice"
        # Every label and button on one line ("随机" was broken in two): the lines its text's boxes lie on.
        lines = page.evaluate(
            """() => [...document.querySelectorAll('label > span, header a, header button, #generate')]
                     .filter(e => e.getClientRects().length)
                     .map(e => { const range = document.createRange(); range.selectNodeContents(e);
                                 const tops = [...range.getClientRects()].map(r => Math.round(r.top));
                                 return [e.textContent, new Set(tops).size] })"""
        )
        assert ["随机" if locale == "zh-CN" else "Random", 1] in lines, lines
        assert all(count == 1 for _, count in lines), lines
        watched.screenshot(f"simple-signed-in-{locale}")
        sign_out.click()
        page.wait_for_url("**/login?next=%2Fsimple")
        assert page.locator("#signed-in").count() == 0
        page.goto(server.url + "/simple", wait_until="networkidle")
        assert "/login" in page.url  # signed out: the page sends the browser to sign in
        # The sign-in page of a signed-in browser offers to sign out too.
        page.fill("#token", tokens["user"])
        page.click("button[type=submit]")
        page.wait_for_url("**/simple")
        page.goto(server.url + "/login", wait_until="networkidle")
        assert "alice" in page.inner_text("#signed-in")
        watched.screenshot(f"sign-in-page-signed-in-{locale}")
        page.click("#signed-in button")
        page.wait_for_url("**/login?next=%2F")
        assert page.locator("#signed-in").count() == 0
        assert watched.errors == []
