"""`--auth auto` is on wherever clients may be on other machines: a bind beyond loopback, a trusted proxy,
or a request that came through a proxy; the start says which and why, and `--auth off` there warns."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.support.app import serving
from tests.support.tokens import make_tokens

PROXY = "127.0.0.1"


def test_behind_a_trusted_proxy_auto_means_on(tmp_path: Path) -> None:
    """The standard deployment (loopback bind, a proxy in front) served everyone as the admin."""
    data = tmp_path / "data"
    tokens = make_tokens(data)
    with serving(data, auth="auto", security={"trusted_proxy": (PROXY,)}, preload=False) as server:
        assert server.runtime.security.auth
        assert "--trusted-proxy" in server.runtime.security.auth_reason
        forwarded = {"X-Forwarded-For": "203.0.113.7"}
        for method, path in (("GET", "/queue"), ("POST", "/history"), ("GET", "/system_stats")):
            assert server.request(method, path, {} if method == "POST" else None, headers=forwarded)[0] == 401
        assert server.as_token(tokens["user"]).request("GET", "/queue", headers=forwarded)[0] == 200


@pytest.mark.parametrize("header", ["X-Forwarded-For", "Forwarded", "X-Real-IP", "X-Forwarded-Proto"])
def test_on_loopback_a_request_that_came_through_a_proxy_needs_a_token(tmp_path: Path, header: str) -> None:
    data = tmp_path / "data"
    tokens = make_tokens(data)
    with serving(data, auth="auto", preload=False) as server:
        assert not server.runtime.security.auth and "loopback only" in server.runtime.security.auth_reason
        assert server.request("GET", "/queue")[0] == 200  # a client on this machine
        value = "for=203.0.113.7" if header == "Forwarded" else "203.0.113.7"
        assert server.request("GET", "/queue", headers={header: value})[0] == 401
        assert server.as_token(tokens["user"]).request("GET", "/queue", headers={header: value})[0] == 200


def test_auth_off_says_so_and_is_not_overridden(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An operator who says off gets off, with a warning at every start where it opens the door."""
    with caplog.at_level(logging.WARNING), serving(tmp_path / "a", auth="off", preload=False) as server:
        assert server.runtime.security.auth_reason == "--auth off"
        assert server.request("GET", "/queue", headers={"X-Forwarded-For": "203.0.113.7"})[0] == 200
    assert "authentication is off" not in caplog.text  # loopback, no proxy: nothing to warn about
    with (
        caplog.at_level(logging.WARNING),
        serving(tmp_path / "b", auth="off", security={"trusted_proxy": (PROXY,)}, preload=False),
    ):
        pass
    assert "authentication is off behind a proxy (--trusted-proxy 127.0.0.1)" in caplog.text
