"""GET /metrics: Prometheus' text format, parsed with prometheus-client's own parser; job outcomes, run and
waiting times, executed nodes, HTTP requests by route template, the queue's depth; admins only with
authentication on, and on a loopback port of its own with --metrics-port.

The counters are the process's: with the application in this process, each test compares a scrape after
what it did with one before."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.server import free_port
from tests.support.app import AppServer, serving
from tests.support.jobs import done, ready, settle, submit
from tests.support.metrics import Samples, samples, scrape, value
from tests.support.serve_command import serve_command
from tests.support.tokens import make_tokens
from tests.workflows import nano_prompt
from zimage_serve import metrics as metrics_module


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    with serving(tmp_path_factory.mktemp("metrics") / "data") as server:
        ready(server)  # its model loaded now, not while another test's server loads one (tests/support/jobs.py)
        yield server


@pytest.fixture()
def server(shared: AppServer) -> AppServer:
    """The shared server, with nothing left queued or running by the test before."""
    settle(shared)
    return shared


def refused_prompt() -> dict:  # type: ignore[type-arg]
    bad = nano_prompt()
    bad["3"]["inputs"]["seed"] = 7
    bad["8"]["inputs"]["vae"] = ["3", 0]  # a LATENT where a VAE goes: refused by validation, never run
    return bad


def test_a_jobs_end_is_counted_with_its_times_and_nodes(server: AppServer) -> None:
    before = scrape(server)
    done(server, submit(server, nano_prompt()))
    assert server.json("POST", "/prompt", {"prompt": refused_prompt()})[0] == 400
    after = scrape(server)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("zimage_jobs_ended_total", outcome="success") == 1
    assert grew("zimage_job_run_seconds_count", outcome="success") == 1
    assert grew("zimage_job_run_seconds_sum", outcome="success") > 0
    assert grew("zimage_job_latency_seconds_sum", outcome="success") >= grew(
        "zimage_job_run_seconds_sum", outcome="success"
    )
    assert grew("zimage_node_executions_total", class_type="KSampler") >= 1
    assert grew("zimage_jobs_ended_total", outcome="error") == 0  # the refused prompt never ran
    assert value(after, "zimage_queue_jobs", state="pending") == 0
    assert value(after, "zimage_queue_jobs", state="success") >= 1 and value(after, "zimage_queue_up") == 1


def test_requests_are_counted_by_route_template_never_by_raw_path(server: AppServer) -> None:
    before = scrape(server)
    for i in range(3):
        assert server.request("GET", f"/history/made-up-{i}")[0] == 200
        assert server.request("GET", f"/api/history/made-up-{i}")[0] == 200  # the frontend's form
    assert server.json("POST", "/prompt", {"prompt": refused_prompt()})[0] == 400
    server.request("GET", "/no/such/route/at/all")
    found = scrape(server)

    def grew(name: str, **labels: str) -> float:
        return value(found, name, **labels) - value(before, name, **labels)

    assert grew("zimage_http_requests_total", method="GET", route="/history/{prompt_id}", status="200") == 6
    assert grew("zimage_http_requests_total", method="POST", route="/prompt", status="400") == 1
    assert grew("zimage_http_request_seconds_count", method="GET", route="/history/{prompt_id}") == 6
    routes = {dict(labels).get("route") for (name, labels) in found if name == "zimage_http_requests_total"}
    assert not any(route and "made-up" in route for route in routes) and "/no/such/route/at/all" not in routes


def test_the_metrics_port_serves_the_same_on_loopback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`zimage serve --metrics-port`: the process's registry also on a loopback port of its own."""
    started: list[tuple[Any, Any]] = []
    start_http_server = metrics_module.start_http_server

    def kept(*args: Any, **kwargs: Any) -> tuple[Any, Any]:  # a process's lives as long as it: this one is stopped
        started.append(start_http_server(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(metrics_module, "start_http_server", kept)
    port = free_port()

    def on_the_port() -> Samples:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
            return samples(answer.read().decode())

    def requests(found: Samples) -> float:
        return value(found, "zimage_http_requests_total", method="GET", route="/history/{prompt_id}", status="200")

    def ask(server: AppServer) -> tuple[bool, float, float]:
        before = on_the_port()
        for _ in range(2):
            server.request("GET", "/history/made-up")
        after = on_the_port()  # the API port's requests, counted in the one registry
        return ("zimage_queue_up", ()) in after, value(after, "zimage_queue_up"), requests(after) - requests(before)

    args = ["--data-dir", str(tmp_path / "data"), "--metrics-port", str(port)]
    try:
        code, _, err, answers = serve_command(args, ask, capsys, monkeypatch)
    finally:
        for server, _ in started:
            server.shutdown()
            server.server_close()
    assert (code, answers) == (0, [(True, 1, 2)]), err


def test_with_authentication_on_metrics_are_for_admins(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tokens = make_tokens(data)
    with serving(data, auth="on", preload=False) as server:
        assert server.request("GET", "/metrics")[0] == 401
        assert server.as_token(tokens["user"]).request("GET", "/metrics")[0] == 403
        assert "zimage_queue_up" in server.as_token(tokens["admin"]).request("GET", "/metrics")[2].decode()
        [device] = server.as_token(tokens["user"]).json("GET", "/system_stats")[1]["devices"]
        assert device["zimage_state"] and "zimage_host" not in device and "zimage_running" not in device
        [device] = server.as_token(tokens["admin"]).json("GET", "/system_stats")[1]["devices"]
        assert device["zimage_host"] and device["zimage_running"] == []
        [worker] = server.as_token(tokens["user"]).json("GET", "/api/zimage/workers")[1]["workers"]
        assert set(worker) == {"id", "state", "heartbeat_age_s"}
        [full] = server.as_token(tokens["admin"]).json("GET", "/api/zimage/workers")[1]["workers"]
        assert {"host", "device", "running"} <= set(full)
        # A worker's id is host:process:random; users see neither the host nor the process.
        assert full["id"].startswith(socket.gethostname() + ":") and worker["id"] == "worker-" + full["id"][-8:]
        assert device["zimage_worker"] == full["id"]  # the admin's /system_stats
        [device] = server.as_token(tokens["user"]).json("GET", "/system_stats")[1]["devices"]
        assert device["zimage_worker"] == worker["id"]
