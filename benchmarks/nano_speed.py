"""End-to-end time of one zimage-nano image at its native size, text encoding included.

    .venv/bin/python benchmarks/nano_speed.py [--runs 20] [--threads 2]

Goal (issue 3): median at most 0.3 s on 2 CPU cores. Prints the median and spread of each stage.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from rich.console import Console
from rich.table import Table

from zimage_serve.cli.common import quiet_libraries
from zimage_serve.engine import GenerationParams, open_engine
from zimage_serve.nano.default import default_model

PROMPTS = [
    "一个红色的圆形在蓝色背景上",
    "a small yellow triangle on the left, black background",
    "左边有一个黄色的三角形",
    "a large cyan square at the top against a purple backdrop",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    quiet_libraries()
    torch.set_num_threads(args.threads)
    engine = open_engine(default_model(), device="cpu")
    for prompt in PROMPTS:  # warm-up
        engine.generate(GenerationParams(prompt))
    samples: dict[str, list[float]] = {}
    for run in range(args.runs):
        result = engine.generate(GenerationParams(PROMPTS[run % len(PROMPTS)], seed=run))
        for stage, seconds in result.timings.items():
            samples.setdefault(stage, []).append(seconds * 1000)
    size = engine.native_size
    table = Table(title=f"zimage-nano, {size}x{size}, 8 steps, {args.runs} runs, {args.threads} threads")
    for column in ("stage", "median ms", "p90 ms", "min ms"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for stage in ("encode", "denoise", "decode", "total"):
        values = sorted(samples[stage])
        p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
        table.add_row(stage, f"{statistics.median(values):.1f}", f"{p90:.1f}", f"{values[0]:.1f}")
    Console().print(table)
    median_total = statistics.median(samples["total"]) / 1000
    verdict = "meets" if median_total <= 0.3 else "misses"
    Console().print(f"median end to end {median_total:.3f} s: {verdict} the 0.3 s goal")


if __name__ == "__main__":
    main()
