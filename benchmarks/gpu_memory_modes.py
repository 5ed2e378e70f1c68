"""Memory modes and FP8 weights at full size on one GPU, each against bf16 all-on-GPU in the same run.

    python benchmarks/gpu_memory_modes.py [--runs 3] [--size 1024] [--out DIR]   # on a CUDA GPU
    python benchmarks/gpu_memory_modes.py --tiny --size 64 --runs 1            # the same code on the CPU

Turbo's architecture with random weights (benchmarks/gpu_bench.py explains why that is the same work).
Rows, one prompt (the field report's medium tier), 8 steps, median of `--runs` after a warm-up:
- bf16, all on the GPU (the reference), and FP8 weights all on the GPU (`fp8_e4m3fn_fast`: FP8 matmuls;
  `fp8_e4m3fn`: FP8 storage), both with the whole fast path (regional compile);
- model offload and sequential offload in bf16, and FP8 with model offload, FP8 with sequential offload
  (eager: offload hooks and compiled blocks do not mix);
- "16 GB card" and "8 GB card" rows run under `torch.cuda.set_per_process_memory_fraction`, the card's
  size less 0.5 GiB for the CUDA context; the row reports whether the peak stayed under the cap.
For each: end to end, peak memory (allocated and reserved), the ratio to the reference, and the final
latents' relative error against bf16 (same noise). Writes `gpu_memory_modes.json` and `.md` under --out.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
from gpu_common import build_model, device_name, parse_arguments, relative_error

from zimage_serve.engine import FastPath, GenerationParams, ZImageEngine
from zimage_serve.engine.devices import MemoryMode
from zimage_serve.engine.fp8 import quantise_transformer
from zimage_serve.engine.loader import LoadedModel
from zimage_serve.engine.offload import apply_memory_mode

PROMPT = "一位穿着汉服的女孩站在樱花树下，阳光洒落，写实风格"
STEPS = 8
GIB = 2**30
CONTEXT_GIB = 0.5  # what a CUDA context takes outside PyTorch's allocator


@dataclass
class Row:
    name: str
    seconds: float
    peak_allocated: int
    peak_reserved: int
    relative_error: float
    cap_gib: float | None = None
    oom: str = ""

    @property
    def held(self) -> bool | None:
        if self.cap_gib is None:
            return None
        return not self.oom and self.peak_reserved <= self.cap_gib * GIB


def cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def measure(
    name: str,
    engine: ZImageEngine,
    args: argparse.Namespace,
    reference: torch.Tensor | None,
    cap_gib: float | None = None,
) -> tuple[Row, torch.Tensor | None]:
    device = engine.device
    if cuda(device) and device.index is None:  # the memory-fraction call wants an indexed device
        device = torch.device("cuda", torch.cuda.current_device())
    size = args.size
    if cuda(device):
        gc.collect()
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = 1.0 if cap_gib is None else min(1.0, (cap_gib * GIB) / total)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        torch.cuda.reset_peak_memory_stats(device)
    params = GenerationParams(PROMPT, width=size, height=size, steps=STEPS, seed=11)
    samples: list[float] = []
    latents = None
    try:
        engine.generate(params)  # warm-up
        for _ in range(args.runs):
            if cuda(device):
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            engine.generate(params)
            if cuda(device):
                torch.cuda.synchronize(device)
            samples.append(time.perf_counter() - started)
        noise = engine.initial_noise([7], size, size)
        latents = engine.denoise(noise, engine.encode_prompt(PROMPT), steps=STEPS).float()
        engine.model.hooks.offload_all()
        oom = ""
    except torch.OutOfMemoryError as exc:
        oom = str(exc).splitlines()[0]
    except Exception as exc:  # a row that breaks is reported as such; the rows after it still run
        oom = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    peak_allocated = torch.cuda.max_memory_allocated(device) if cuda(device) else 0
    peak_reserved = torch.cuda.max_memory_reserved(device) if cuda(device) else 0
    if cuda(device):
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    error = relative_error(latents, reference) if latents is not None and reference is not None else 0.0
    seconds = statistics.median(samples) if samples else float("nan")
    row = Row(name, seconds, peak_allocated, peak_reserved, error, cap_gib, oom)
    print(f"{name}: {seconds:.3f} s, peak {peak_reserved / GIB:.2f} GiB {oom}", flush=True)
    return row, latents


def engine_for(model: LoadedModel, mode: MemoryMode, fast: FastPath, size: int) -> ZImageEngine:
    """An engine over `model`'s modules (already on the host for offload modes) with `mode`'s hooks."""
    placement = replace(model.placement, memory_mode=mode)
    modules = [model.text_encoder, model.transformer, model.vae]
    loaded = replace(model, placement=placement, hooks=apply_memory_mode(placement, modules))
    return ZImageEngine(loaded, native_size=size, fast=fast)


def host_copy(model: LoadedModel) -> LoadedModel:
    """The components copied to host memory (hooks are attached to copies, never to the originals)."""
    return replace(
        model,
        transformer=copy.deepcopy(model.transformer).to("cpu"),
        text_encoder=copy.deepcopy(model.text_encoder).to("cpu"),
        vae=copy.deepcopy(model.vae).to("cpu"),
    )


def main() -> None:
    args = parse_arguments(__doc__.splitlines()[0], runs=3)
    started = time.perf_counter()
    model = build_model(args)
    device = model.placement.device
    host = host_copy(model)  # taken before the fast path compiles the blocks
    fast = FastPath(compile=args.compile)
    eager = FastPath(compile="off")
    rows: list[Row] = []

    reference_row, reference = measure("bf16, all on the GPU", ZImageEngine(model, args.size, fast), args, None)
    assert reference is not None
    rows.append(reference_row)
    save(args, device, rows)
    for weight_dtype in ("fp8_e4m3fn_fast", "fp8_e4m3fn"):
        transformer = copy.deepcopy(host.transformer)  # the host copy has no compiled blocks yet
        quantise_transformer(transformer, weight_dtype)
        placement = replace(model.placement, weight_dtype=weight_dtype)
        quantised = replace(model, transformer=transformer.to(device), placement=placement)
        rows.append(
            measure(f"{weight_dtype}, all on the GPU", ZImageEngine(quantised, args.size, fast), args, reference)[0]
        )
        save(args, device, rows)
        del quantised, transformer
    del model
    torch._dynamo.reset()  # compiled blocks hold the all-on-GPU weights; the capped rows must start empty
    gc.collect()
    if cuda(device):
        torch.cuda.empty_cache()
        print(f"before the offload rows: {torch.cuda.memory_allocated(device) / GIB:.2f} GiB allocated", flush=True)

    # On the CPU (the script's own check) the hooks run with the CPU as their device and nothing is capped.
    card16, card8 = (16 - CONTEXT_GIB, 8 - CONTEXT_GIB) if cuda(device) else (None, None)
    # The capped rows (the goals) first, the slowest row last.
    for label, mode, weight_dtype, cap in (
        ("16 GB card: bf16, model offload", MemoryMode.MODEL, "default", card16),
        ("16 GB card: fp8_e4m3fn, model offload", MemoryMode.MODEL, "fp8_e4m3fn", card16),
        ("8 GB card: fp8_e4m3fn, sequential offload", MemoryMode.SEQUENTIAL, "fp8_e4m3fn", card8),
        ("bf16, model offload", MemoryMode.MODEL, "default", None),
        ("bf16, sequential offload", MemoryMode.SEQUENTIAL, "default", None),
    ):
        offloaded = host_copy(host)
        if weight_dtype != "default":
            quantise_transformer(offloaded.transformer, weight_dtype)
            offloaded.placement = replace(offloaded.placement, weight_dtype=weight_dtype)
        rows.append(measure(label, engine_for(offloaded, mode, eager, args.size), args, reference, cap_gib=cap)[0])
        save(args, device, rows)
        del offloaded

    print("\n".join(save(args, device, rows)))
    print(f"total {time.perf_counter() - started:.0f}s")


def save(args: argparse.Namespace, device: torch.device, rows: list[Row]) -> list[str]:
    """Write the rows measured so far (a run cut short by its time limit still leaves them)."""
    base = rows[0].seconds
    name = device_name(device)
    lines = [
        f"Card: {name}; torch {torch.__version__}; {args.size}x{args.size}, {STEPS} steps, median of {args.runs} "
        f"after a warm-up; compile {args.compile} for the all-on-GPU rows; {time.strftime('%Y-%m-%d')}.",
        "",
        "| mode | end to end | vs bf16 all-on-GPU | peak allocated | peak reserved | cap | cap held | latent error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cap = "" if row.cap_gib is None else f"{row.cap_gib:.1f} GiB"
        held = "" if row.held is None else ("yes" if row.held else f"NO {row.oom}")
        failed = f" ({row.oom})" if row.oom and row.cap_gib is None else ""
        lines.append(
            f"| {row.name}{failed} | {row.seconds:.3f} s | {row.seconds / base:.2f}x | "
            f"{row.peak_allocated / GIB:.2f} GiB | {row.peak_reserved / GIB:.2f} GiB | {cap} | {held} | "
            f"{row.relative_error:.2e} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "device": name,
        "torch": torch.__version__,
        "size": args.size,
        "runs": args.runs,
        "compile": args.compile,
        "rows": [{**row.__dict__, "held": row.held} for row in rows],
    }
    (args.out / "gpu_memory_modes.json").write_text(json.dumps(report, indent=2))
    (args.out / "gpu_memory_modes.md").write_text("\n".join(lines) + "\n")
    return lines


if __name__ == "__main__":
    main()
