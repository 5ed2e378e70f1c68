"""How long `zimage serve`'s event loop stalls while large graphs are validated: the slowest GET /system_stats
while four 4 MB POST /prompt bodies are parsed and validated at once, against one such POST alone.

    .venv/bin/python benchmarks/event_loop_stall.py [--rounds 3]

A real server on loopback. Each round times one large body alone, then sends four at once while this
client asks /system_stats every 20 ms, and prints the slowest of those answers over the time of the one
alone. A loop blocked by a parse keeps /system_stats waiting about as long as one large request takes
(a ratio near 1, or above); with the bodies parsed off the loop, one at a time, it is answered between
their steps (measured when this was fixed: 0.06–0.34 s against 0.38–0.48 s alone, about 3 times less).
Run it on a quiet machine: both figures grow with the load, the ratio less so. The test suite checks the
behaviour, not the figure (tests/test_hardening.py: a parse is held until /system_stats is answered).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.server import Server, running_server
from tests.support.jobs import small_job, wait_until


def large_body() -> bytes:
    """A normal job carrying a 4 MB workflow in extra_pnginfo, as a big frontend graph does."""
    graph = small_job("large")
    padding = [{"id": i, "widgets_values": ["x" * 40, i, 1.5]} for i in range(60_000)]
    return json.dumps({"prompt": graph, "extra_data": {"extra_pnginfo": {"workflow": {"nodes": padding}}}}).encode()


def one_round(server: Server, body: bytes) -> tuple[float, float, int]:
    """(one large POST alone, the slowest /system_stats while four are sent at once, /system_stats answers)."""
    started = time.perf_counter()
    assert server.request("POST", "/prompt", raw=body)[0] == 200
    alone = time.perf_counter() - started
    answers: list[int] = []
    senders = [
        threading.Thread(target=lambda: answers.append(server.request("POST", "/prompt", raw=body)[0]))
        for _ in range(4)
    ]
    for sender in senders:
        sender.start()
    slowest, asked = 0.0, 0
    while any(sender.is_alive() for sender in senders):
        started = time.perf_counter()
        assert server.request("GET", "/system_stats")[0] == 200
        slowest, asked = max(slowest, time.perf_counter() - started), asked + 1
        time.sleep(0.02)
    assert answers == [200] * 4, answers
    return alone, slowest, asked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    body = large_body()
    with tempfile.TemporaryDirectory() as work, running_server(Path(work) / "data") as server:
        wait_until(lambda: server.request("GET", "/health")[0] == 200)  # the worker's model loaded: a quiet start
        one_round(server, body)  # warm-up: the first parse and validation pay for imports and caches
        ratios = []
        for index in range(args.rounds):
            alone, slowest, asked = one_round(server, body)
            ratios.append(slowest / alone)
            print(
                f"round {index + 1}: one {len(body) / 1e6:.1f} MB POST /prompt alone {alone:.3f} s; slowest "
                f"/system_stats while four were validated {slowest:.3f} s ({asked} answers); ratio {ratios[-1]:.2f}"
            )
    print(f"event loop stall, slowest /system_stats over one large POST alone: worst {max(ratios):.2f} "
          f"(a loop blocked by the parses: about 1 or more)")  # fmt: skip


if __name__ == "__main__":
    main()
