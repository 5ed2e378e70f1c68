"""How long light `zimage` commands take to start and finish (the command line imports heavy libraries
only in the commands that use them; tests/test_cli.py checks which modules a light command loads).

    .venv/bin/python benchmarks/cli_start.py [--runs 10]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ZIMAGE = [sys.executable, "-m", "zimage_serve.cli"]


def timed(args: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([*ZIMAGE, *args], check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    runs = parser.parse_args().runs
    with tempfile.TemporaryDirectory(prefix="zimage-bench-") as work:
        measure(runs, Path(work) / "data")


def measure(runs: int, data: Path) -> None:
    subprocess.run([*ZIMAGE, "tokens", "create", "bench", "--data-dir", str(data)], check=True, capture_output=True)
    commands = {
        "zimage --help": ["--help"],
        "zimage serve --help": ["serve", "--help"],
        "zimage batch --help": ["batch", "--help"],
        "zimage templates list": ["templates", "list", "--data-dir", str(data)],
        "zimage tokens list": ["tokens", "list", "--data-dir", str(data)],
        "zimage audit verify": ["audit", "verify", "--data-dir", str(data)],
        "python -c pass (the floor)": None,
    }
    print(f"{'':32}{'median s':>10}{'min s':>10}  ({runs} runs each)")
    for label, args in commands.items():
        if args is None:
            floor = []
            for _ in range(runs):
                started = time.perf_counter()
                subprocess.run([sys.executable, "-c", "pass"], check=True)
                floor.append(time.perf_counter() - started)
            found = floor
        else:
            found = timed(args, runs)
        print(f"{label:32}{statistics.median(found):10.3f}{min(found):10.3f}")


if __name__ == "__main__":
    main()
