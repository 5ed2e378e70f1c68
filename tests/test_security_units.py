"""The security pieces on their own: settings from flags, TOML and the environment (and what the server
does with them); the network policy; identities carried into jobs; owners in the queue file (older files
included); tokens' storage and how soon a revocation is seen; the rate limiter."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.support.app import serving
from tests.support.serve_command import serve_command
from zimage_serve.config import ConfigError, ServeConfig
from zimage_serve.identity import Identity, JobContext
from zimage_serve.limits import Limits
from zimage_serve.queue.jobs import Job, NewJob, Quota, QuotaExceeded
from zimage_serve.queue.sqlite_queue import SQLiteQueue
from zimage_serve.security import tokens as token_module
from zimage_serve.security.network import NetworkPolicy, NetworkSettingError
from zimage_serve.security.rate import RateLimiter
from zimage_serve.security.tokens import SESSIONS_PER_TOKEN, TokenError, TokenStore


def test_flags_win_over_the_environment_over_the_toml_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "zimage.toml"
    toml.write_text('port = 9000\nauth = "on"\nallow_ip = ["10.0.0.0/8"]\nmax_steps = 50\n', "utf-8")
    config = ServeConfig.load(toml)
    assert (config.port, config.auth, config.allow_ip, config.limits().steps) == (9000, "on", ["10.0.0.0/8"], 50)
    monkeypatch.setenv("ZIMAGE_PORT", "9100")
    monkeypatch.setenv("ZIMAGE_ALLOW_IP", '["192.168.0.0/16"]')
    monkeypatch.setenv("ZIMAGE_MODELS", "/a:/b")  # PATH-like: the command's, not a JSON list
    config = ServeConfig.load(toml)
    assert (config.port, config.allow_ip, config.models) == (9100, ["192.168.0.0/16"], [])
    assert ServeConfig.load(toml, port=9200, auth=None).port == 9200
    with pytest.raises(ConfigError) as bad:
        ServeConfig.load(toml, auth="maybe")
    assert bad.value.option == "--auth" and "from the flag" in str(bad.value)
    monkeypatch.setenv("ZIMAGE_PORT", "0")
    with pytest.raises(ConfigError) as bad:
        ServeConfig.load(None)
    assert bad.value.option == "--port" and "ZIMAGE_PORT" in str(bad.value)
    monkeypatch.delenv("ZIMAGE_PORT")
    (tmp_path / "broken.toml").write_text("port = = 1", "utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        ServeConfig.load(tmp_path / "broken.toml")
    (tmp_path / "unknown.toml").write_text("colour = 1", "utf-8")
    with pytest.raises(ConfigError) as bad:
        ServeConfig.load(tmp_path / "unknown.toml")
    assert bad.value.option == "--colour"
    with pytest.raises(ConfigError, match="not a file"):
        ServeConfig.load(tmp_path / "missing.toml")


def test_auth_from_a_config_file_reaches_the_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command's settings, from its TOML file, are the server's."""
    toml = tmp_path / "zimage.toml"
    toml.write_text('auth = "on"\n', "utf-8")
    args = ["--config", str(toml), "--data-dir", str(tmp_path / "data")]
    code, _, err, answers = serve_command(args, lambda server: server.request("GET", "/queue")[0], capsys, monkeypatch)
    assert (code, answers) == (0, [401]), err
    assert "authentication on" in err


def test_auth_follows_the_bind_address_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="zimage_serve.security.guard")
    with serving(tmp_path / "b", auth="auto", listen="0.0.0.0", preload=False) as server:  # auto: on when exposed
        assert server.request("GET", "/queue")[0] == 401
    assert "no token exists" in caplog.text
    caplog.clear()
    with serving(tmp_path / "c", auth="off", listen="0.0.0.0", preload=False) as server:
        assert server.request("GET", "/queue")[0] == 200
    assert "authentication is off and the server listens on 0.0.0.0" in caplog.text
    caplog.clear()
    with serving(tmp_path / "d", auth="auto", preload=False) as server:  # auto on loopback: off, and nothing to say
        assert server.request("GET", "/queue")[0] == 200
    assert "authentication" not in caplog.text


def test_a_bad_security_option_stops_the_command_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before anything is served (an option taken by mistake would be asked once, not served for ever)."""
    for args, named in (
        (["--allow-ip", "10.0.0.0/33"], "--allow-ip"),
        (["--trusted-proxy", "proxy"], "--trusted-proxy"),
        (["--allow-origin", "evil.example"], "--allow-origin"),
        (["--public-url", "images.example.com"], "--public-url"),
        (["--blocklist", str(tmp_path / "none.txt")], "--blocklist"),
        (["--audit-prompts", "some"], "--audit-prompts"),
        (["--auth", "maybe"], "--auth"),
    ):
        command = ["--data-dir", str(tmp_path / "data"), *args]
        code, _, stderr, served = serve_command(command, lambda server: "served", capsys, monkeypatch)
        assert (code, served) == (2, []), (args, stderr)
        assert named in stderr and "Traceback" not in stderr, stderr


def test_the_network_policy() -> None:
    policy = NetworkPolicy.build(["10.0.0.0/8", "2001:db8::/32"], ["127.0.0.1", "::1"], ["https://app.example"])
    assert policy.allowed("10.9.8.7") and policy.allowed("2001:db8::1") and not policy.allowed("192.0.2.1")
    assert policy.allowed("::ffff:10.1.1.1")  # IPv4 mapped into IPv6
    assert not policy.allowed("garbage")
    assert policy.client("127.0.0.1", "10.1.1.1") == "10.1.1.1"
    assert policy.client("::1", "2001:db8::5, 127.0.0.1") == "2001:db8::5"
    assert policy.client("192.0.2.9", "10.1.1.1") == "192.0.2.9"  # not a trusted proxy
    assert policy.cross_site("localhost:8188", "http://localhost:8188", None) is None
    # An Origin without a port is its scheme's default port: a page on http://localhost is port 80's.
    assert policy.cross_site("localhost:8188", "http://localhost", None) is not None
    assert policy.cross_site("localhost", "http://localhost", None) is None  # a Host without one: the default
    assert policy.cross_site("images.example:443", "https://images.example", None) is None
    assert policy.cross_site("images.example:80", "https://images.example", None) is not None
    assert policy.cross_site("[::1]:8188", "http://[::1]:8188", None) is None
    assert policy.cross_site("localhost:8188", "http://localhost:9999", None) is not None
    assert policy.cross_site("localhost:8188", "https://app.example", None) is None
    assert policy.cross_site("localhost:8188", None, "cross-site") is not None
    assert policy.cross_site("localhost:8188", None, "same-site") is None
    assert policy.cross_site("localhost:8188", None, "cross-site", navigation=True) is None  # a link followed
    assert policy.rebinding("localhost:8188") is None and policy.rebinding("127.0.0.5") is None
    assert policy.rebinding("attacker.example:8188") is not None
    assert NetworkPolicy.build(listen="0.0.0.0").rebinding("images.example.com") is None
    for bad in (["10.0.0.0/33"], ["host"]):
        with pytest.raises(NetworkSettingError):
            NetworkPolicy.build(bad)
    with pytest.raises(NetworkSettingError):
        NetworkPolicy.build(allow_origin=["https://app.example/path"])


def test_a_jobs_identity_carries_the_tokens_limits_to_the_worker() -> None:
    server = Limits(steps=100, pixels=10**6)
    identity = Identity("alice", "user", "10.0.0.1", server.for_token("alice", steps=8, pixels=None))
    context = identity.job_context(images=3, images_per_day=20)
    stored = {"role": "user", "address": "10.0.0.1", "limits": {"steps": 8}, "images": 3, "images_per_day": 20}
    assert context.to_json() == stored and JobContext.from_json(stored) == context
    again = Identity.of_job("alice", context, server)
    assert again.limits is not None and again.limits.steps == 8 and again.limits.pixels == 10**6
    assert again.space == "alice" and not again.admin and again.may_see("alice") and not again.may_see("bob")
    assert "token 'alice'" in again.limits.refusal("steps", 9)
    assert Identity.of_job("", JobContext(), server).admin  # the local operator's jobs
    # A row written by an earlier version, or damaged: what is there and sound is kept, the rest defaulted.
    assert JobContext.from_json({"role": "emperor", "limits": {"steps": "8", "pixels": 9}, "images": -1}) == JobContext(
        limits={"pixels": 9}
    )
    assert JobContext.from_json(["not", "an", "object"]) == JobContext()


def test_owners_in_the_queue_file_and_an_older_file_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        """CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, number REAL NOT NULL,
        prompt TEXT NOT NULL, extra_data TEXT NOT NULL, outputs TEXT NOT NULL, state TEXT NOT NULL CHECK (state IN
        ('pending', 'running', 'success', 'error', 'interrupted')), attempts INTEGER NOT NULL DEFAULT 0,
        created REAL NOT NULL, started REAL, finished REAL, result TEXT);
        INSERT INTO jobs (id, number, prompt, extra_data, outputs, state, created)
        VALUES ('old', 1, '{}', '{}', '[]', 'pending', 1.0);"""
    )
    db.commit()
    db.close()
    store = SQLiteQueue(path)
    [old] = store.pending()
    assert old.owner == "" and old.context == JobContext()
    store.enqueue_many([NewJob.of(Job("a1", 2, {}, {}, [], owner="alice", context=JobContext("user", images=2)))])
    store.enqueue_many([NewJob.of(Job("b1", 3, {}, {}, [], owner="bob", context=JobContext("user", images=1)))])
    assert [j.id for j in store.pending()] == ["old", "a1", "b1"]
    assert store.queue_items_json("pending", owner="alice")[0].startswith('[2, "a1"')
    assert store.count("pending", "alice") == 1 and store.count("pending") == 3
    assert store.delete_pending(None, owner="bob") == 1 and store.count("pending") == 2
    assert store.delete_pending(["a1"], owner="bob") == 0
    quota = Quota(max_queued=1, images_per_day=3)
    [refused] = store.enqueue_many(
        [NewJob.of(Job("a2", 4, {}, {}, [], owner="alice", context=JobContext(images=1)), quota)]
    )
    assert isinstance(refused, QuotaExceeded) and refused.quota == "max_queued"
    job = store.claim()
    assert job is not None and job.id == "old"
    store.finish("old", "success", {"outputs": {}})
    job = store.claim()
    assert job is not None and job.owner == "alice" and job.context == JobContext("user", images=2)
    store.finish("a1", "success", {"outputs": {}})
    [refused] = store.enqueue_many(
        [NewJob.of(Job("a3", 5, {}, {}, [], owner="alice", context=JobContext(images=2)), quota)]
    )
    assert isinstance(refused, QuotaExceeded) and refused.quota == "images_per_day" and refused.retry_after >= 1
    assert [j.id for j in store.history(owner="alice")] == ["a1"] and store.count_finished("alice") == 1
    assert {u["user"]: u["images_today"] for u in store.usage()} == {"alice": 2, "bob": 1}
    outbox = store._db.execute("SELECT job_id, owner FROM audit_outbox ORDER BY id").fetchall()
    assert [tuple(row) for row in outbox] == [("old", ""), ("a1", "alice")]
    store.close()


def test_tokens_are_kept_as_hashes_and_checked(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "auth.sqlite3")
    token, record = store.create("alice", "user", rpm=3)
    assert store.lookup(token) == record and store.lookup(token + "x") is None
    assert token.encode() not in (tmp_path / "auth.sqlite3").read_bytes()
    with pytest.raises(TokenError):
        store.create("alice")
    with pytest.raises(TokenError):
        store.create("alice2", rpm=0)
    with pytest.raises(TokenError):
        store.create(".hidden")
    store.revoke("alice")
    assert store.lookup(token) is not None and not store.lookup(token).active  # type: ignore[union-attr]
    assert store.take_revoked() == []  # revoked through this store: its caller acts on it (the next test: another's)
    again, _ = store.create("alice")  # a revoked name may be given a new token
    assert store.lookup(token) is None and store.lookup(again) is not None
    store.close()


def test_users_have_ids_a_reused_name_is_a_new_user_and_older_token_files_keep_theirs(tmp_path: Path) -> None:
    path = tmp_path / "auth.sqlite3"
    old = sqlite3.connect(path)  # a file written before users had ids: the user was the token's name
    old.executescript(
        "CREATE TABLE tokens (name TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE, role TEXT NOT NULL, rpm INTEGER, "
        "images_per_day INTEGER, max_queued INTEGER, max_pixels INTEGER, max_steps INTEGER, created REAL NOT NULL, "
        "last_used REAL, revoked REAL);"
        "INSERT INTO tokens (name, hash, role, created) VALUES ('alice', 'x', 'user', 1.0);"
    )
    old.commit()
    old.close()
    store = TokenStore(path)
    assert [t.owner for t in store.tokens()] == ["alice"]  # keeps the files it has under users/alice
    store.revoke("alice")
    _, second = store.create("alice")
    store.revoke("alice")
    _, third = store.create("alice")
    store.revoke("alice")
    _, continued = store.create("alice", inherit=True)
    assert (second.owner, third.owner, continued.owner) == ("alice~2", "alice~3", "alice~3")
    with pytest.raises(TokenError, match="no earlier token named 'erin'"):
        store.create("erin", inherit=True)
    store.close()


def test_a_token_revoked_by_another_process_stops_working_within_a_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's copy of the tokens is read again once REFRESH_S has passed: a second later at the most
    (on a clock of the test's)."""

    class Clock:
        now = 1000.0

        def monotonic(self) -> float:
            return self.now

        def time(self) -> float:
            return time.time()

    clock = Clock()
    monkeypatch.setattr(token_module, "time", clock)
    server, command = TokenStore(tmp_path / "auth.sqlite3"), TokenStore(tmp_path / "auth.sqlite3")
    token, _ = command.create("dana")
    clock.now += 1.0
    assert server.lookup(token).active  # type: ignore[union-attr]
    command.revoke("dana")
    clock.now += 1.0
    found = server.lookup(token)
    assert found is not None and not found.active and server.take_revoked() == ["dana"]
    server.close()
    command.close()


def test_the_rate_limiter_slides() -> None:
    limiter = RateLimiter()
    assert [limiter.take("a", 2, now=t) for t in (0.0, 1.0, 2.0)] == [0, 0, 58]
    assert limiter.take("a", 2, now=60.5) == 0  # the first left the window
    assert limiter.take("b", 2, now=2.0) == 0 and limiter.recent("a", now=60.9) == 2


def test_a_tokens_sign_in_sessions_are_bounded_oldest_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """1,500 sign-ins from one token each kept a month-long session; now the oldest beyond the bound end."""
    clock = SimpleNamespace(now=1_000_000.0)
    monkeypatch.setattr(token_module, "time", SimpleNamespace(time=lambda: clock.now, monotonic=time.monotonic))
    store = TokenStore(tmp_path / "auth.sqlite3")
    token, _ = store.create("erin")
    other, _ = store.create("frank")
    secrets = []
    for _ in range(SESSIONS_PER_TOKEN + 5):
        clock.now += 1
        opened = store.open_session(token)
        assert opened is not None
        secrets.append(opened[0])
    kept = store.open_session(other)
    assert kept is not None
    assert [store.session(s) is not None for s in secrets] == [False] * 5 + [True] * SESSIONS_PER_TOKEN
    assert store.session(kept[0]) is not None  # another token's sessions are its own


def test_a_token_revoked_here_is_not_handed_out_again_as_revoked_elsewhere(tmp_path: Path) -> None:
    """The server acts on a revocation made through its API at once; its maintenance turn, which acts on
    those made elsewhere (another node, the command line), must not act on it a second time, even when it
    runs while the revocation is being made (here: just after it read the tokens again)."""
    store = TokenStore(tmp_path / "auth.sqlite3")
    store.create("alice", "user")
    store.create("bob", "user")
    assert store.take_revoked() == []
    taken: list[list[str]] = []
    maintenance = threading.Thread(target=lambda: taken.append(store.take_revoked()))
    original = store.refresh

    def refresh(force: bool = False) -> None:
        original(force)
        if force and not maintenance.is_alive() and not taken:  # revoke's own reading, after its write
            maintenance.start()
            maintenance.join(0.2)  # it waits for the revocation to be done, or takes it if it may

    store.refresh = refresh  # type: ignore[method-assign]
    store.revoke("alice")
    maintenance.join(30)
    assert taken == [[]]
    store.refresh = original  # type: ignore[method-assign]
    TokenStore(tmp_path / "auth.sqlite3").revoke("bob")  # elsewhere: the command line
    store._checked = float("-inf")
    assert store.take_revoked() == ["bob"]
