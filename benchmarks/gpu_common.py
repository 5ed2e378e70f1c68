"""What the GPU benchmarks share: their model options, the random full-size model, the error measure."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from zimage_serve.cli.common import quiet_libraries
from zimage_serve.engine.loader import LoadedModel
from zimage_serve.nano.random_model import TinyConfig, build_random_model


def parse_arguments(description: str, runs: int) -> argparse.Namespace:
    """The benchmarks' shared options (with `runs` as the default number of timed runs), parsed."""
    parser = argparse.ArgumentParser(description=description)
    add_model_arguments(parser, runs)
    args = parser.parse_args()
    quiet_libraries()
    return args


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def add_model_arguments(parser: argparse.ArgumentParser, runs: int) -> None:
    parser.add_argument("--tiny", action="store_true", help="a small config (CPU check of this script)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=runs)
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 on CUDA")
    parser.add_argument("--out", type=Path, default=Path("."))


def build_model(args: argparse.Namespace) -> LoadedModel:
    """Turbo's architecture (or the tiny config) with random weights, built on the device."""
    device = torch.device(args.device)
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
    started = time.perf_counter()
    model = build_random_model(device, torch.bfloat16 if bf16 else torch.float32, TinyConfig() if args.tiny else None)
    print(f"built {model.sources.name} on {device} in {time.perf_counter() - started:.1f}s", flush=True)
    return model


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float(torch.linalg.norm((got - expected).float()) / torch.linalg.norm(expected.float()))
