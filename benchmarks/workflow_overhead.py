"""What running through a workflow costs on top of the engine, measured side by side in one process.

    .venv/bin/python benchmarks/workflow_overhead.py [--runs 20] [--threads 2]

Both paths make the same zimage-nano image (128², 8 euler steps, a new seed per run, the prompt
changing every run so text encoding is always paid): `ZImageEngine.generate`, and the shipped
`zimage_serve/workflows/zimage_nano.api.json` validated and executed with the loaders cached (PNG saving included).
Runs alternate between the two so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from zimage_serve import workflows
from zimage_serve.cli.common import quiet_libraries
from zimage_serve.engine import GenerationParams, open_engine
from zimage_serve.engine.placement import Placement
from zimage_serve.nano.default import default_model
from zimage_serve.workflow.execute import Executor
from zimage_serve.workflow.folders import Folders
from zimage_serve.workflow.nodes import NODES
from zimage_serve.workflow.validate import Validator

WORKFLOW = workflows.NANO
PROMPTS = [
    "一个红色的圆形在蓝色背景上",
    "a small yellow triangle on the left",
    "左边有一个黄色的三角形",
    "a cyan square",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    quiet_libraries()
    torch.set_num_threads(args.threads)
    engine = open_engine(default_model(), device="cpu")
    scratch = tempfile.TemporaryDirectory(prefix="zimage-bench-")  # removed with the object, at the end
    folders = Folders.default(Path(scratch.name))
    executor = Executor(NODES, folders, Placement.choose("cpu"))
    validator = Validator(NODES, folders)
    template = json.loads(WORKFLOW.read_text())

    def through_workflow(run: int) -> float:
        started = time.perf_counter()
        prompt = json.loads(json.dumps(template))
        prompt["6"]["inputs"]["text"] = f"{PROMPTS[run % len(PROMPTS)]} {run}"
        prompt["3"]["inputs"]["seed"] = run
        checked = validator.validate(prompt)
        result = executor.run(str(run), checked.prompt, checked.outputs, {}, None)
        assert result.ok, result.error
        return time.perf_counter() - started

    def through_engine(run: int) -> float:
        started = time.perf_counter()
        engine.generate(GenerationParams(f"{PROMPTS[run % len(PROMPTS)]} {run}", seed=run))
        return time.perf_counter() - started

    for warm in range(3):
        through_workflow(1000 + warm)
        through_engine(1000 + warm)
    workflow_times, engine_times = [], []
    for run in range(args.runs):
        workflow_times.append(through_workflow(run))
        engine_times.append(through_engine(run))
    wf, en = statistics.median(workflow_times), statistics.median(engine_times)
    console = Console()
    console.print(f"zimage-nano 128², 8 steps, {args.runs} runs each, {args.threads} threads")
    console.print(f"engine.generate   median {en * 1000:7.1f} ms")
    console.print(f"workflow (cached) median {wf * 1000:7.1f} ms  (validation, execution, PNG save)")
    console.print(f"workflow / engine = {wf / en:.2f}; overhead {1000 * (wf - en):+.1f} ms per image")


if __name__ == "__main__":
    main()
