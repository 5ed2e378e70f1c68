"""GET /metrics against a real server: Prometheus' text format, parsed with prometheus-client's own parser;
job outcomes, run and waiting times, executed nodes, HTTP requests by route template, the queue's depth;
admins only with authentication on, and on a loopback port of its own with --metrics-port."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server import Server, free_port, running_server
from tests.support.metrics import samples, scrape, value
from tests.support.tokens import make_tokens
from tests.workflows import nano_prompt


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, int]]:
    port = free_port()
    with running_server(tmp_path_factory.mktemp("metrics") / "data", "--metrics-port", str(port)) as server:
        yield server, port


def finish(server: Server, prompt: dict) -> str:  # type: ignore[type-arg]
    status, answer = server.json("POST", "/prompt", {"prompt": prompt})
    assert status == 200, answer
    prompt_id = answer["prompt_id"]
    deadline = time.monotonic() + 60
    while not server.json("GET", f"/history/{prompt_id}")[1]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return str(prompt_id)


def test_a_jobs_end_is_counted_with_its_times_and_nodes(served: tuple[Server, int]) -> None:
    server, _ = served
    before = scrape(server)
    finish(server, nano_prompt())
    bad = nano_prompt()
    bad["3"]["inputs"]["seed"] = 7
    bad["8"]["inputs"]["vae"] = ["3", 0]  # a LATENT where a VAE goes: refused by validation, never run
    assert server.json("POST", "/prompt", {"prompt": bad})[0] == 400
    after = scrape(server)
    assert (
        value(after, "zimage_jobs_ended_total", outcome="success")
        == value(before, "zimage_jobs_ended_total", outcome="success") + 1
    )
    assert value(after, "zimage_job_run_seconds_count", outcome="success") >= 1
    assert value(after, "zimage_job_run_seconds_sum", outcome="success") > 0
    assert value(after, "zimage_job_latency_seconds_sum", outcome="success") >= value(
        after, "zimage_job_run_seconds_sum", outcome="success"
    )
    assert value(after, "zimage_node_executions_total", class_type="KSampler") >= 1
    assert value(after, "zimage_queue_jobs", state="pending") == 0
    assert value(after, "zimage_queue_jobs", state="success") >= 1 and value(after, "zimage_queue_up") == 1


def test_requests_are_counted_by_route_template_never_by_raw_path(served: tuple[Server, int]) -> None:
    server, _ = served
    for i in range(3):
        assert server.request("GET", f"/history/made-up-{i}")[0] == 200
        assert server.request("GET", f"/api/history/made-up-{i}")[0] == 200  # the frontend's form
    server.request("GET", "/no/such/route/at/all")
    found = scrape(server)
    assert value(found, "zimage_http_requests_total", method="GET", route="/history/{prompt_id}", status="200") >= 6
    assert value(found, "zimage_http_requests_total", method="POST", route="/prompt", status="400") >= 1
    assert value(found, "zimage_http_request_seconds_count", method="GET", route="/history/{prompt_id}") >= 3
    routes = {dict(labels).get("route") for (name, labels) in found if name == "zimage_http_requests_total"}
    assert not any(route and "made-up" in route for route in routes) and "/no/such/route/at/all" not in routes


def test_the_metrics_port_serves_the_same_on_loopback(served: tuple[Server, int]) -> None:
    _, port = served
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        found = samples(answer.read().decode())
    assert ("zimage_queue_up", ()) in found and value(found, "zimage_jobs_ended_total", outcome="success") >= 1


def test_with_authentication_on_metrics_are_for_admins(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tokens = make_tokens(data)
    with running_server(data, "--auth", "on") as server:
        assert server.request("GET", "/metrics")[0] == 401
        assert server.as_token(tokens["user"]).request("GET", "/metrics")[0] == 403
        assert "zimage_queue_up" in server.as_token(tokens["admin"]).request("GET", "/metrics")[2].decode()
        [device] = server.as_token(tokens["user"]).json("GET", "/system_stats")[1]["devices"]
        assert device["zimage_state"] and "zimage_host" not in device and "zimage_running" not in device
        [device] = server.as_token(tokens["admin"]).json("GET", "/system_stats")[1]["devices"]
        assert device["zimage_host"] and device["zimage_running"] == []
        [worker] = server.as_token(tokens["user"]).json("GET", "/api/zimage/workers")[1]["workers"]
        assert set(worker) == {"id", "state", "heartbeat_age_s"}
        [worker] = server.as_token(tokens["admin"]).json("GET", "/api/zimage/workers")[1]["workers"]
        assert {"host", "device", "running"} <= set(worker)
