"""What live previews cost: the same zimage-nano workflow run with previews on (someone watching) and off,
side by side in one process, on the CPU.

    .venv/bin/python benchmarks/preview_cost.py [--runs 30] [--size 128] [--steps 8] [--threads 2]

Each run is the shipped zimage-nano workflow with a new seed and prompt (nothing cached but the loaders);
runs alternate between the two settings so machine noise hits both alike. With previews on, every preview
the run makes is encoded as it would be sent (projection, JPEG, base64); the events go nowhere. The time
spent making previews is also summed directly (the difference of two medians is noisier than the cost).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from zimage_serve import workflows
from zimage_serve.cli.common import quiet_libraries
from zimage_serve.engine.placement import Placement
from zimage_serve.workflow import previews as run_previews
from zimage_serve.workflow.execute import Executor
from zimage_serve.workflow.folders import Folders
from zimage_serve.workflow.nodes import NODES
from zimage_serve.workflow.previews import PreviewSettings
from zimage_serve.workflow.validate import Validator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    quiet_libraries()
    torch.set_num_threads(args.threads)
    scratch = tempfile.TemporaryDirectory(prefix="zimage-bench-")  # removed with the object, at the end
    folders = Folders.default(Path(scratch.name))
    placement = Placement.choose("cpu")
    # One executor (the same loaded models for both): a run asks for no previews as a prompt can.
    executor = Executor(NODES, folders, placement, previews=PreviewSettings("auto"))
    executors = {"previews on": {}, "previews off": {"preview_method": "none"}}
    validator = Validator(NODES, folders)
    making = [0.0]
    preview = run_previews.RunPreviews._preview

    def timed(self: run_previews.RunPreviews, *args: Any) -> None:
        started = time.perf_counter()
        preview(self, *args)
        making[0] += time.perf_counter() - started

    run_previews.RunPreviews._preview = timed  # type: ignore[method-assign]
    template = json.loads(workflows.NANO.read_text())
    previews: dict[str, int] = {name: 0 for name in executors}

    def run(name: str, index: int) -> float:
        prompt = json.loads(json.dumps(template))
        # A prompt and seed of its own for every run of either setting: nothing is served from the cache.
        unique = 2 * index + (name == "previews off")
        prompt["6"]["inputs"]["text"] = f"a red circle on a blue background, number {unique}"
        prompt["3"]["inputs"].update(seed=unique, steps=args.steps)
        prompt["13"]["inputs"].update(width=args.size, height=args.size)
        checked = validator.validate(prompt)

        def counted(event: str, data: dict[str, Any]) -> None:
            previews[name] += event == "preview"

        started = time.perf_counter()
        result = executor.run(
            f"{name}-{index}", checked.prompt, checked.outputs, dict(executors[name]), counted, watched=lambda: True
        )
        assert result.status == "success", result.messages
        return time.perf_counter() - started

    for name in executors:  # loaders, caches and the first preview's map, before anything is timed
        run(name, -1)
        previews[name] = 0
    making[0] = 0.0
    times: dict[str, list[float]] = {name: [] for name in executors}
    for index in range(args.runs):
        for name in executors if index % 2 == 0 else reversed(list(executors)):
            times[name].append(run(name, index))
    on, off = statistics.median(times["previews on"]), statistics.median(times["previews off"])
    print(f"zimage-nano, {args.size}², {args.steps} steps, {args.runs} runs each, {args.threads} threads")
    for name, found in times.items():
        print(f"  {name:<13} median {statistics.median(found) * 1000:7.1f} ms  previews sent: {previews[name]}")
    print(f"  previews cost {100 * (on / off - 1):+.1f} % of an image's time (the medians' difference)")
    share = 100 * making[0] / sum(times["previews on"])
    print(f"  making them: {making[0] / args.runs * 1000:.2f} ms a run, {share:.2f} % of an image's time")


if __name__ == "__main__":
    main()
