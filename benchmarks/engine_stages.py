"""Time each engine stage on the CPU with a small model of Z-Image's architecture.

    .venv/bin/python benchmarks/engine_stages.py [--size 256] [--steps 8] [--runs 5]

Builds a random-weight model (about 1/40 of Turbo's width), loads it through the diffusers-folder
loader, warms up once, then reports the median and spread of each stage over several runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from zimage_serve.cli.common import quiet_libraries
from zimage_serve.engine import GenerationParams, open_engine
from zimage_serve.nano.random_model import TinyConfig, write_random_model

SMALL = TinyConfig(
    transformer={"dim": 256, "n_layers": 4, "n_refiner_layers": 1, "n_heads": 4, "n_kv_heads": 4, "cap_feat_dim": 128},
    text_encoder={
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
    },
    vae={"block_out_channels": [32, 64, 64, 64], "layers_per_block": 1},
)
PROMPT = "一位穿着汉服的女孩站在樱花树下，阳光洒落，写实风格"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    quiet_libraries()

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_random_model(Path(tmp) / "small", SMALL, seed=0)
        started = time.perf_counter()
        engine = open_engine(folder, device="cpu")
        load_s = time.perf_counter() - started
        params = GenerationParams(PROMPT, width=args.size, height=args.size, steps=args.steps)
        engine.generate(params)  # warm-up: first calls allocate and pick kernels

        samples: dict[str, list[float]] = {}
        for run in range(args.runs):
            result = engine.generate(
                GenerationParams(PROMPT, width=args.size, height=args.size, steps=args.steps, seed=run)
            )
            for stage, seconds in result.timings.items():
                samples.setdefault(stage, []).append(seconds)

    transformer_params = sum(p.numel() for p in engine.model.transformer.parameters())
    table = Table(
        title=f"engine stages, {args.size}x{args.size}, {args.steps} steps, {args.runs} runs, "
        f"{torch.get_num_threads()} CPU threads"
    )
    for column in ("stage", "median ms", "min ms", "max ms"):
        table.add_column(column, justify="right" if column != "stage" else "left")
    for stage in ("encode", "denoise", "decode", "total"):
        values = [s * 1000 for s in samples[stage]]
        table.add_row(stage, f"{statistics.median(values):.1f}", f"{min(values):.1f}", f"{max(values):.1f}")
    table.add_row("per step", f"{statistics.median(samples['denoise']) * 1000 / args.steps:.1f}", "", "")
    table.add_row("load (once)", f"{load_s * 1000:.0f}", "", "")
    console = Console()
    console.print(table)
    console.print(
        f"transformer: {transformer_params / 1e6:.1f} M parameters (Turbo: 6,155 M); torch {torch.__version__}"
    )


if __name__ == "__main__":
    main()
