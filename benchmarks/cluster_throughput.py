"""Model-free jobs per second through the SQLite queue and through Redis with 1 and 2 workers, side by side
in one run, with the CPU each job costs every process and the Redis commands it takes; then the time from
a worker's SIGKILL (and from a worker freezing) to its job running again on another worker.

    .venv/bin/python benchmarks/cluster_throughput.py [--jobs 2000] [--clients 4] [--rounds 2] [--lease 5]

The graph is server_throughput.py's (LoadImage → SaveImage, a new prefix per job, nothing cached), posted
over loopback by `--clients` threads. Configurations:
- sqlite: one `zimage serve` (its worker process, the queue in the data dir's SQLite file);
- redis, N workers: a redis-server (AOF on, fsync every second, as the README advises), one
  `zimage serve --queue redis://... --workers 0`, and N `zimage worker` processes.
Every process shares this machine's cores with the others and with the load generator, so the ratios
between configurations say more than the absolute figures. Rounds alternate the configurations.

The failover part posts the nano workflow at 200 steps to a 2-worker cluster, waits until a worker runs it,
then SIGKILLs that worker (reaped at once, as systemd does: another worker sees the process gone at its
next heartbeat, lease/3) or SIGSTOPs it (only the lease can free the job), and times until another
worker's heartbeat lists the job as running.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import redis
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.server_throughput import Scratch, get_json, submit_all
from tests.redis_server import RedisServer
from tests.server import Server, WorkerProc, proc_stat, running_server, running_worker, worker_processes

from zimage_serve import workflows


def cpu_s(pid: int) -> float:
    fields = proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") if fields else 0.0


@contextmanager
def configuration(data: Path, name: str, workers: int, lease: float, jobs: int) -> Iterator[dict[str, Any]]:
    """The processes of one configuration, started and warm, with `data` as the data folder (Redis's files
    beside it): {"server", "workers", "redis"}."""
    with ExitStack() as stack:
        (data / "input").mkdir(parents=True)
        Image.new("RGB", (64, 64), "red").save(data / "input" / "bench.png")
        found: dict[str, Any] = {"workers": [], "redis": None}
        args = ["--max-queue", str(jobs + 10), "--lease", str(lease)]
        if name == "sqlite":
            found["server"] = stack.enter_context(running_server(data, *args))
        else:
            server = RedisServer(data.parent / "redis")
            server.start()
            stack.callback(server.stop, True)
            client = redis.Redis(port=server.port)
            client.config_set("appendfsync", "everysec")
            found["redis"], found["client"] = server, client
            found["server"] = stack.enter_context(running_server(data, "--queue", server.url, "--workers", "0", *args))
            for _ in range(workers):
                found["workers"].append(stack.enter_context(running_worker(data, server.url, "--lease", str(lease))))
        node: Server = found["server"]
        deadline = time.monotonic() + 120
        while node.request("GET", "/health")[0] != 200:
            if time.monotonic() > deadline:
                raise SystemExit(f"{name}: the workers did not become ready")
            time.sleep(0.2)
        submit_all(node.port, ["warm-up"], 1)  # one job through: every worker process is warm
        while get_json(node.port, "/prompt")["exec_info"]["queue_remaining"] > 0:
            time.sleep(0.01)
        yield found


def pids(found: dict[str, Any]) -> dict[str, list[int]]:
    server: Server = found["server"]
    local = worker_processes(server.process.pid)  # the SQLite mode's worker process
    return {
        "server": [server.process.pid],
        "workers": [w.pid for w in found["workers"]] + local,
        "redis": [found["redis"].process.pid] if found["redis"] is not None else [],
    }


def measure(data: Path, name: str, workers: int, args: argparse.Namespace) -> dict[str, float]:
    with configuration(data, name, workers, args.lease, args.jobs) as found:
        node: Server = found["server"]
        processes = pids(found)
        before = {role: sum(cpu_s(p) for p in ids) for role, ids in processes.items()}
        commands = found["client"].info("stats")["total_commands_processed"] if found["redis"] else 0
        started = time.perf_counter()
        submit_seconds = submit_all(node.port, [f"bench/{i}" for i in range(args.jobs)], args.clients)
        while get_json(node.port, "/prompt")["exec_info"]["queue_remaining"] > 0:
            time.sleep(0.01)
        total = time.perf_counter() - started
        after = {role: sum(cpu_s(p) for p in ids) for role, ids in processes.items()}
        finished = get_json(node.port, f"/history?max_items={args.jobs + 10}")
        succeeded = sum(entry["status"]["status_str"] == "success" for entry in finished.values())
        if succeeded != args.jobs + 1:
            raise SystemExit(f"{name}: only {succeeded - 1} of {args.jobs} jobs succeeded")
        result = {
            "submissions/s": args.jobs / submit_seconds,
            "completed jobs/s": args.jobs / total,
            "API node CPU ms/job": 1000 * (after["server"] - before["server"]) / args.jobs,
            "workers CPU ms/job": 1000 * (after["workers"] - before["workers"]) / args.jobs,
            "redis-server CPU ms/job": 1000 * (after["redis"] - before["redis"]) / args.jobs,
        }
        if found["redis"] is not None:
            # INFO's count includes the two INFO calls themselves; negligible beside thousands of jobs.
            result["Redis commands/job"] = (
                found["client"].info("stats")["total_commands_processed"] - commands
            ) / args.jobs
        else:
            result["Redis commands/job"] = 0.0
        return result


def running_elsewhere(node: Server, prompt_id: str, other_than: int | None) -> dict[str, Any] | None:
    for worker in node.json("GET", "/api/zimage/workers")[1]["workers"]:
        if worker["pid"] != other_than and any(r["prompt_id"] == prompt_id for r in worker["running"]):
            return worker
    return None


def failover(data: Path, args: argparse.Namespace, how: str) -> float:
    """Seconds from a worker's SIGKILL (or SIGSTOP) mid-job to another worker running that job."""
    with configuration(data, "redis", 2, args.lease, 10) as found:
        node: Server = found["server"]
        prompt = workflows.load(workflows.NANO)
        prompt["3"]["inputs"].update(steps=200, seed=int(time.time()))
        status, answer = node.json("POST", "/prompt", {"prompt": prompt})
        assert status == 200, answer
        prompt_id = answer["prompt_id"]
        while (holder := running_elsewhere(node, prompt_id, None)) is None:
            time.sleep(0.05)
        victim: WorkerProc = next(w for w in found["workers"] if w.pid == holder["pid"])
        started = time.perf_counter()
        if how == "SIGKILL":
            os.kill(victim.pid, signal.SIGKILL)
            victim.process.wait()  # reaped, as a service manager does
        else:
            os.kill(victim.pid, signal.SIGSTOP)
        while running_elsewhere(node, prompt_id, victim.pid) is None:
            time.sleep(0.02)
        seconds = time.perf_counter() - started
        if how != "SIGKILL":
            os.kill(victim.pid, signal.SIGKILL)
        return seconds


CONFIGURATIONS = (("sqlite", 1), ("redis, 1 worker", 1), ("redis, 2 workers", 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lease", type=float, default=5.0)
    args = parser.parse_args()
    with Scratch() as scratch:
        report(scratch, args)


def report(scratch: Scratch, args: argparse.Namespace) -> None:
    results: dict[str, list[dict[str, float]]] = {label: [] for label, _ in CONFIGURATIONS}
    for _ in range(args.rounds):
        for label, workers in CONFIGURATIONS:
            results[label].append(measure(scratch.data(), label.split(",")[0], workers, args))
    print(f"{args.jobs} model-free jobs from {args.clients} client threads, median of {args.rounds} rounds")
    print(f"{'':26}" + "".join(f"{label:>20}" for label in results))
    for key in results[CONFIGURATIONS[0][0]][0]:
        row = [statistics.median(r[key] for r in results[label]) for label in results]
        print(f"{key:26}" + "".join(f"{v:20.2f}" for v in row))
    base = statistics.median(r["completed jobs/s"] for r in results["sqlite"])
    for label in list(results)[1:]:
        rate = statistics.median(r["completed jobs/s"] for r in results[label])
        print(f"completed jobs/s, {label} / sqlite: {rate / base:.2f}")
    for how in ("SIGKILL", "SIGSTOP"):
        times = [failover(scratch.data(), args, how) for _ in range(args.rounds)]
        print(f"{how} of a worker mid-job → running on the other (lease {args.lease:g} s): "
              f"{', '.join(f'{t:.2f}' for t in times)} s")  # fmt: skip


if __name__ == "__main__":
    main()
