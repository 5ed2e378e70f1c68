"""Prometheus metrics (prometheus-client), one home for every name.

Where each is observed:
- a job's end (outcome, run time, time from queued to ended, the nodes it executed), in the process that
  recorded it: a worker, or the server that hears it from its worker process (`JobEnded`);
- HTTP requests by route template (never by raw path: a client cannot grow the label set), on API nodes;
- webhook deliveries (by endpoint, which only an admin creates) and their latency, on API nodes;
- the queue's depth per state, the workers' heartbeat ages and device memory, read from the queue and
  the register when scraped, on API nodes.

`GET /metrics` serves the API node's; `--metrics-port` serves a process's on a loopback port of its own
(the way to scrape a `zimage worker`, and an API node with authentication on without a token).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry()
# Seconds: a nano image takes ~0.1 s, Turbo at 1024² about a second on an H100, and a CPU minutes.
_JOB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 1800)
_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

WEBHOOK_DELIVERIES = Counter(
    "zimage_webhook_deliveries",
    "Webhook delivery tries, by endpoint and outcome (delivered, retried, dead)",
    ["endpoint", "outcome"],
    registry=REGISTRY,
)
WEBHOOK_LATENCY_SECONDS = Histogram(
    "zimage_webhook_latency_seconds",
    "Time from a job's event to its endpoint's 2xx answer",
    buckets=(*_HTTP_BUCKETS, 30, 60, 300, 900, 3600),
    registry=REGISTRY,
)
OUTPUT_UPLOADS = Counter(
    "zimage_output_uploads",
    "Jobs' output uploads to the object store, by outcome (stored, retried, dead)",
    ["outcome"],
    registry=REGISTRY,
)
OUTPUT_UPLOAD_SECONDS = Histogram(
    "zimage_output_upload_seconds",
    "Time from a job's end to every one of its files being in the object store",
    buckets=(*_HTTP_BUCKETS, 30, 60, 300, 900, 3600),
    registry=REGISTRY,
)
JOBS_ENDED = Counter("zimage_jobs_ended", "Jobs recorded as ended, by outcome", ["outcome"], registry=REGISTRY)
JOB_RUN_SECONDS = Histogram(
    "zimage_job_run_seconds", "Time a job ran on its worker", ["outcome"], buckets=_JOB_BUCKETS, registry=REGISTRY
)
JOB_LATENCY_SECONDS = Histogram(
    "zimage_job_latency_seconds",
    "Time from a job's queueing to its end (waiting included)",
    ["outcome"],
    buckets=_JOB_BUCKETS,
    registry=REGISTRY,
)
NODE_EXECUTIONS = Counter(
    "zimage_node_executions", "Nodes executed (not cached), by class", ["class_type"], registry=REGISTRY
)
QUEUE_UNAVAILABLE = Counter(
    "zimage_queue_unavailable",
    "Calls refused because the queue could not take them: Redis unreachable, or out of memory",
    ["reason"],
    registry=REGISTRY,
)
HTTP_REQUESTS = Counter(
    "zimage_http_requests", "HTTP requests answered, by route", ["method", "route", "status"], registry=REGISTRY
)
HTTP_SECONDS = Histogram(
    "zimage_http_request_seconds",
    "Time to answer an HTTP request, by route",
    ["method", "route"],
    buckets=_HTTP_BUCKETS,
    registry=REGISTRY,
)


@dataclass(frozen=True)
class JobEnd:
    """What the metrics take from one job's end (plain data: it crosses the worker process's pipe)."""

    outcome: str  # success, error or interrupted
    run_s: float
    latency_s: float
    nodes: dict[str, int] = field(default_factory=dict)  # class_type → executions


def observe_job(end: JobEnd) -> None:
    JOBS_ENDED.labels(end.outcome).inc()
    JOB_RUN_SECONDS.labels(end.outcome).observe(max(0.0, end.run_s))
    JOB_LATENCY_SECONDS.labels(end.outcome).observe(max(0.0, end.latency_s))
    for class_type, count in end.nodes.items():
        NODE_EXECUTIONS.labels(class_type).inc(count)


def observe_request(method: str, route: str, status: int, seconds: float) -> None:
    HTTP_REQUESTS.labels(method, route, str(status)).inc()
    HTTP_SECONDS.labels(method, route).observe(seconds)


class ClusterCollector(Collector):
    """Read when scraped: the queue's jobs per state and each worker's heartbeat age and device memory.
    `counts` and `workers` are the API node's views (a cluster's whole queue and register)."""

    def __init__(self, counts: Callable[[], dict[str, int]], workers: Callable[[], Iterable[dict[str, Any]]]) -> None:
        self.counts, self.workers = counts, workers

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "zimage_queue_jobs", "Jobs in the queue (or its kept history) by state", labels=["state"]
        )
        up = GaugeMetricFamily("zimage_queue_up", "1 if the queue answered this scrape, else 0")
        try:
            counts = self.counts()
            up.add_metric([], 1)
        except Exception:  # an unreachable queue is a value here (0), not a failed scrape
            counts = {}
            up.add_metric([], 0)
        for state, n in counts.items():
            depth.add_metric([state], n)
        yield depth
        yield up
        beat = GaugeMetricFamily(
            "zimage_worker_heartbeat_age_seconds",
            "Seconds since each worker's last heartbeat",
            labels=["worker", "host"],
        )
        running = GaugeMetricFamily("zimage_worker_running_jobs", "Jobs each worker runs now", labels=["worker"])
        memory = GaugeMetricFamily(
            "zimage_worker_device_memory_bytes",
            "Each worker's device memory (GPU; 0 on a CPU), total and free",
            labels=["worker", "device", "kind"],
        )
        try:
            workers = list(self.workers())
        except Exception:
            workers = []
        for worker in workers:
            name = str(worker.get("id", ""))
            beat.add_metric([name, str(worker.get("host", ""))], float(worker.get("heartbeat_age_s", 0.0)))
            running.add_metric([name], len(worker.get("running", [])))
            device = worker.get("device") or {}
            if isinstance(device, dict):
                for kind, key in (("total", "vram_total"), ("free", "vram_free")):
                    memory.add_metric([name, str(device.get("name", "")), kind], float(device.get(key, 0) or 0))
        yield beat
        yield running
        yield memory


class _Process(Collector):
    """This process's metrics, for a registry that adds a node's own collector to them."""

    def collect(self) -> Iterator[Any]:
        yield from REGISTRY.collect()


def node_registry(extra: Collector | None = None) -> CollectorRegistry:
    """What a node serves: this process's metrics, and `extra` (an API node's view of the cluster)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Process())
    if extra is not None:
        registry.register(extra)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def serve_on(port: int, registry: CollectorRegistry, address: str = "127.0.0.1") -> None:
    """`registry` on a port of its own (loopback unless told otherwise), from a thread of its own."""
    start_http_server(port, addr=address, registry=registry)
