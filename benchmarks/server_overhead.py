"""What an image costs through `zimage serve` against `ZImageEngine.generate`, side by side in one run.

    .venv/bin/python benchmarks/server_overhead.py [--images 10] [--warmups 2]

Both make the same zimage-nano image (128², 8 euler steps, a new seed and prompt each time, so text
encoding is always paid). The engine runs in this process; the server is a real `zimage serve` process
on loopback, timed from the POST /prompt to the WebSocket's closing `executing` (its history entry is
written by then). The two alternate, image by image, so machine noise hits both alike. Goal (issue 16):
the server path within 1.15× of the engine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch
from websockets.sync.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.server import running_server
from workflow_overhead import PROMPTS  # the same prompts as the workflow-against-engine benchmark

from zimage_serve import workflows
from zimage_serve.cli.common import quiet_libraries
from zimage_serve.engine import GenerationParams, open_engine
from zimage_serve.nano.default import default_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--warmups", type=int, default=2)
    args = parser.parse_args()
    quiet_libraries()
    engine = open_engine(default_model(), device="cpu")
    template = workflows.load(workflows.NANO)

    with tempfile.TemporaryDirectory() as work, running_server(Path(work) / "data") as server:
        client_id = uuid.uuid4().hex
        with connect(f"{server.ws_url}?clientId={client_id}", max_size=None) as socket:

            def through_server(run: int) -> float:
                prompt = json.loads(json.dumps(template))
                prompt["6"]["inputs"]["text"] = f"{PROMPTS[run % len(PROMPTS)]} {run}"
                prompt["3"]["inputs"]["seed"] = run
                started = time.perf_counter()
                status, answer = server.json("POST", "/prompt", {"prompt": prompt, "client_id": client_id})
                assert status == 200, answer
                while True:
                    message = json.loads(socket.recv())
                    data = message.get("data", {})
                    done = data.get("node") is None and data.get("prompt_id") == answer["prompt_id"]
                    if message["type"] == "executing" and done:
                        break
                    if message["type"] == "execution_error":
                        raise RuntimeError(data)
                return time.perf_counter() - started

            def through_engine(run: int) -> float:
                started = time.perf_counter()
                engine.generate(GenerationParams(f"{PROMPTS[run % len(PROMPTS)]} {run}", seed=run))
                return time.perf_counter() - started

            for warm in range(args.warmups):
                through_server(1000 + warm)
                through_engine(1000 + warm)
            server_times, engine_times = [], []
            for run in range(args.images):
                server_times.append(through_server(run))
                engine_times.append(through_engine(run))
    srv, eng = statistics.median(server_times), statistics.median(engine_times)
    print(
        f"zimage-nano 128², 8 steps, {args.images} images each (interleaved, {args.warmups} warm-ups), "
        f"torch threads here {torch.get_num_threads()}"
    )
    for label, times in (("engine.generate", engine_times), ("zimage serve (POST → done)", server_times)):
        shown = f"{min(times) * 1000:.0f}-{max(times) * 1000:.0f}"
        print(f"{label:<27} median {statistics.median(times) * 1000:7.1f} ms  (range {shown})")
    print(f"server / engine = {srv / eng:.2f}")


if __name__ == "__main__":
    main()
