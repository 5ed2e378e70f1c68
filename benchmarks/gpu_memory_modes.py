"""Smart memory on the cards the field runs, each against everything on the GPU in the same run.

    python benchmarks/gpu_memory_modes.py [--runs 2] [--size 1024] [--out DIR]   # on a CUDA GPU
    python benchmarks/gpu_memory_modes.py --tiny --size 64 --runs 1            # the same code on the CPU

Turbo's architecture with random weights (benchmarks/gpu_bench.py explains why that is the same work),
8 steps at --size, eager throughout (smart memory does not compile by default). Rows:
- bf16 and fp8_e4m3fn_fast with everything on the GPU: the references;
- smart memory under per-process memory caps standing for the cards: 24 GB (23.5 GiB, bf16), 16 GB (15.5 GiB,
  bf16 and FP8), 12 GB (11.5 GiB, FP8) and 8 GB (7.5 GiB, FP8).
Each row times images with a new prompt each (the text encoder runs for every image) and with one prompt
repeated (the prompt cache skips it): the median of --runs after a warm-up, each against bf16 all on the GPU
in the same case. It also gives the peak memory, the bytes copied to the card per new-prompt image, the
final latents' relative error against the all-on-GPU row of the same weights (0: the same image), and
whether one image at the largest default size (--large, 2048²: `--max-pixels`' default) in 2 steps ran
under the cap. Writes `gpu_memory_modes.json` and `.md` under --out, after each row.
On the CPU the caps are fake cards (`FixedBudget`) holding the same share of the tiny model's weights.
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
from gpu_common import add_model_arguments, build_model, device_name, relative_error

from zimage_serve.cli.common import quiet_libraries
from zimage_serve.engine import FastPath, GenerationParams, ZImageEngine, activations
from zimage_serve.engine.devices import MemoryMode
from zimage_serve.engine.fp8 import quantise_transformer
from zimage_serve.engine.loader import LoadedModel, manage
from zimage_serve.engine.residency import CudaBudget, FixedBudget, Residency
from zimage_serve.engine.residency_plan import Footprint

PROMPT = "一位穿着汉服的女孩站在樱花树下，阳光洒落，写实风格"
STEPS = 8
GIB = 2**30
TURBO_GIB = 20.5  # Turbo's bf16 weights: a fake card on the CPU holds the same share of the tiny model's
FP8 = "fp8_e4m3fn_fast"
CARDS = (  # (row, cap in GiB: the card less 0.5 GiB for the CUDA context, transformer weights)
    ("24 GB card", 23.5, "default"),
    ("16 GB card", 15.5, "default"),
    ("16 GB card", 15.5, FP8),
    ("12 GB card", 11.5, FP8),
    ("8 GB card", 7.5, FP8),
)


@dataclass
class Row:
    name: str
    new_prompt_s: float
    same_prompt_s: float
    peak_allocated: int
    peak_reserved: int
    moved_per_image: int
    relative_error: float
    large: str
    cap_gib: float | None = None
    failed: str = ""

    @property
    def held(self) -> bool | None:
        if self.cap_gib is None:
            return None
        return not self.failed and self.peak_reserved <= self.cap_gib * GIB


def cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def measure(
    name: str, engine: ZImageEngine, args: argparse.Namespace, reference: torch.Tensor | None, cap_gib: float | None
) -> tuple[Row, torch.Tensor | None]:
    """Time new-prompt and repeated-prompt images, take the final latents, then try the large size."""
    device = engine.device
    if cuda(device) and device.index is None:  # the memory-fraction call wants an indexed device
        device = torch.device("cuda", torch.cuda.current_device())
    if cuda(device):
        gc.collect()
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(1.0 if cap_gib is None else min(1.0, cap_gib * GIB / total), device)
        torch.cuda.reset_peak_memory_stats(device)
    residency = engine.model.residency
    peaks = RowPeaks(device)  # smart memory resets the peak counters to measure its calls: kept across resets

    def timed(prompt: str, size: int = args.size, steps: int = STEPS) -> float:
        if cuda(device):
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        engine.generate(GenerationParams(prompt, width=size, height=size, steps=steps, seed=11))
        if cuda(device):
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    new: list[float] = []
    same: list[float] = []
    moved = 0
    latents = None
    failed = ""
    try:
        timed(f"{PROMPT} (warm-up)")
        before = residency.moved_in if residency is not None else 0
        new = [timed(f"{PROMPT} ({run})") for run in range(args.runs)]
        moved = ((residency.moved_in if residency is not None else 0) - before) // max(args.runs, 1)
        timed(PROMPT)
        same = [timed(PROMPT) for _ in range(args.runs)]
        noise = engine.initial_noise([7], args.size, args.size)
        latents = engine.denoise(noise, engine.encode_prompt(PROMPT), steps=STEPS).float()
    except Exception as exc:  # a row that breaks is reported as such; the rows after it still run
        failed = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    peak_allocated, peak_reserved = peaks.end()
    large = "not tried"
    if not failed:
        try:
            large = f"ran ({timed(PROMPT, args.large, 2):.1f} s)"
        except Exception as exc:
            large = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    if cuda(device):
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    error = relative_error(latents, reference) if latents is not None and reference is not None else 0.0
    row = Row(name, _median(new), _median(same), peak_allocated, peak_reserved, moved, error, large, cap_gib, failed)
    print(
        f"{name}: new prompt {row.new_prompt_s:.3f} s, same prompt {row.same_prompt_s:.3f} s, peak "
        f"{peak_reserved / GIB:.2f} GiB, moved {_size(moved)} an image, {args.large}²: {large} {failed}",
        flush=True,
    )
    return row, latents


class RowPeaks:
    """The row's peak memory, though smart memory resets PyTorch's peak counters on a call at a new size."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.allocated = self.reserved = 0
        self._reset = torch.cuda.reset_peak_memory_stats
        if cuda(device):
            torch.cuda.reset_peak_memory_stats = self._before_reset  # type: ignore[assignment]

    def _before_reset(self, device: Any = None) -> None:
        self._take()
        self._reset(device)

    def _take(self) -> None:
        self.allocated = max(self.allocated, torch.cuda.max_memory_allocated(self.device))
        self.reserved = max(self.reserved, torch.cuda.max_memory_reserved(self.device))

    def end(self) -> tuple[int, int]:
        if not cuda(self.device):
            return 0, 0
        self._take()
        torch.cuda.reset_peak_memory_stats = self._reset  # type: ignore[assignment]
        return self.allocated, self.reserved


def _size(size: int) -> str:
    return f"{size / GIB:.2f} GiB" if size >= GIB // 10 or not size else f"{size / 2**20:.2f} MiB"


def _median(samples: list[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


def host_copy(model: LoadedModel) -> LoadedModel:
    """The components copied to host memory (smart memory manages copies, never the reference's modules)."""
    return replace(
        model,
        transformer=copy.deepcopy(model.transformer).to("cpu"),
        text_encoder=copy.deepcopy(model.text_encoder).to("cpu"),
        vae=copy.deepcopy(model.vae).to("cpu"),
    )


def card_for(residency: Residency, model: LoadedModel, cap_gib: float) -> None:
    """Everything moved out, as on a fresh card. On CUDA the cap is the process's memory fraction, which the
    budget reads; on the CPU, a fake card holding the same share of the model's weights as the cap holds of
    Turbo's (never less than its largest component needs to run)."""
    residency.free()
    if isinstance(residency.budget, CudaBudget):  # as well as the memory fraction, which older PyTorch cannot read
        residency.budget.limit = int(cap_gib * GIB)
    if isinstance(residency.budget, FixedBudget):
        footprints = [footprint(module) for module in (model.text_encoder, model.transformer, model.vae)]
        weights = sum(f.total for f in footprints)
        residency.budget.size = max(int(weights * cap_gib / TURBO_GIB), max(f.needs(0) for f in footprints))


def footprint(module: Any) -> Footprint:
    found: Footprint = module._zimage_residency[1].footprint
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, runs=2)
    parser.add_argument("--large", type=int, default=None, help="the large size tried per row (2048; 128 --tiny)")
    args = parser.parse_args()
    args.large = args.large or (128 if args.tiny else 2048)
    quiet_libraries()
    started = time.perf_counter()
    model = build_model(args)
    device = model.placement.device
    host = host_copy(model)
    eager = FastPath(compile="off")
    rows: list[Row] = []
    references: dict[str, torch.Tensor | None] = {}

    engine = ZImageEngine(model, args.size, eager)
    row, references["default"] = measure("bf16, all on the GPU", engine, args, None, None)
    rows.append(row)
    save(args, device, rows)
    fp8_transformer = copy.deepcopy(host.transformer)  # quantised once, for its reference and its smart rows
    quantise_transformer(fp8_transformer, FP8)
    fp8 = replace(model, transformer=fp8_transformer.to(device), placement=replace(model.placement, weight_dtype=FP8))
    engine = ZImageEngine(fp8, args.size, eager)
    row, references[FP8] = measure(f"{FP8}, all on the GPU", engine, args, references["default"], None)
    rows.append(row)
    save(args, device, rows)
    fp8_transformer.to("cpu")
    del model, fp8, engine
    gc.collect()
    if cuda(device):
        torch.cuda.empty_cache()
        print(f"before the capped rows: {torch.cuda.memory_allocated(device) / GIB:.2f} GiB allocated", flush=True)

    # One set of host weights for every capped row: the text encoder, the VAE and both transformers, each
    # copied once into (pinned) host memory; each row starts with all of them moved out.
    residency = Residency(device, CudaBudget(device) if cuda(device) else FixedBudget(0, calls_take=0))
    smart_bf16 = manage(replace(host, placement=replace(host.placement, memory_mode=MemoryMode.SMART)), residency)
    residency.add(fp8_transformer, f"transformer ({FP8})", activations.transformer(fp8_transformer.config))
    fp8_placement = replace(smart_bf16.placement, weight_dtype=FP8)
    smart_fp8 = replace(smart_bf16, transformer=fp8_transformer, placement=fp8_placement)
    for card, cap, weight_dtype in CARDS:
        smart = smart_bf16 if weight_dtype == "default" else smart_fp8
        card_for(residency, smart, cap)
        label = f"{card}: {'bf16' if weight_dtype == 'default' else weight_dtype}, smart"
        engine = ZImageEngine(smart, args.size, eager)
        rows.append(measure(label, engine, args, references[weight_dtype], cap if cuda(device) else None)[0])
        save(args, device, rows)

    print("\n".join(save(args, device, rows)))
    print(f"total {time.perf_counter() - started:.0f}s")


def save(args: argparse.Namespace, device: torch.device, rows: list[Row]) -> list[str]:
    """Write the rows measured so far (a run cut short by its time limit still leaves them)."""
    base = rows[0]
    name = device_name(device)
    lines = [
        f"Card: {name}; torch {torch.__version__}; {args.size}x{args.size}, {STEPS} steps, median of {args.runs} "
        f"after a warm-up, eager; {time.strftime('%Y-%m-%d')}.",
        "",
        "| row | new prompt | vs bf16 on the GPU | same prompt | vs bf16 on the GPU | moved per image | "
        "peak reserved | cap | cap held | latent error | " + f"{args.large}², 2 steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cap = "" if row.cap_gib is None else f"{row.cap_gib:.1f} GiB"
        held = "" if row.held is None else ("yes" if row.held else "NO")
        failed = f" ({row.failed})" if row.failed else ""
        lines.append(
            f"| {row.name}{failed} | {row.new_prompt_s:.3f} s | {row.new_prompt_s / base.new_prompt_s:.2f}x | "
            f"{row.same_prompt_s:.3f} s | {row.same_prompt_s / base.same_prompt_s:.2f}x | "
            f"{_size(row.moved_per_image)} | {row.peak_reserved / GIB:.2f} GiB | {cap} | {held} | "
            f"{row.relative_error:.2e} | {row.large} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "device": name,
        "torch": torch.__version__,
        "size": args.size,
        "large": args.large,
        "runs": args.runs,
        "rows": [{**row.__dict__, "held": row.held} for row in rows],
    }
    (args.out / "gpu_memory_modes.json").write_text(json.dumps(report, indent=2))
    (args.out / "gpu_memory_modes.md").write_text("\n".join(lines) + "\n")
    return lines


if __name__ == "__main__":
    main()
