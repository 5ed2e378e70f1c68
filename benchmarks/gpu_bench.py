"""Z-Image-Turbo at full size on one GPU: the engine's fast path against diffusers' ZImagePipeline.

    python benchmarks/gpu_bench.py [--runs 5] [--size 1024] [--out DIR]      # on a CUDA GPU
    python benchmarks/gpu_bench.py --tiny --size 64 --runs 2                 # the same code on the CPU

Builds Turbo's real architecture with random weights on the device (the same work per image as the
real weights; nothing to download), then, for the field report's three prompt tiers, runs a warm-up
and `--runs` timed generations at 8 steps of:
1. diffusers' own `ZImagePipeline` (bf16, guidance 0, its default attention): the baseline;
2. the engine with the fast path but no compile (attention backend, no host syncs, channels-last VAE);
3. the engine with the whole fast path (plus regional torch.compile), prompt cache cleared each run;
4. the same with the prompt cached (a repeated prompt, as a server sees them).
Each stage (text encoding, denoising, VAE decoding) is timed the same way for all of them: CUDA events
recorded by hooks on the modules, so no extra synchronisation enters the timed code. Peak memory is
read per row. In the same run it checks that the fast path's final latents match the baseline's (same
noise, relative error < 1e-2), that the step loop makes no host synchronisation (CUDA's sync debug
mode), and that 8 steps make 8 transformer calls; it times one transformer call per attention backend
installed. Prints a table and writes `gpu_bench.json` and `gpu_bench.md` under `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from gpu_common import add_model_arguments, build_model, relative_error

from zimage_serve.cli.common import quiet_libraries
from zimage_serve.engine import FastPath, GenerationParams, ZImageEngine
from zimage_serve.engine.fastpath import ATTENTION_PREFERENCE, attention_available
from zimage_serve.engine.loader import LoadedModel
from zimage_serve.engine.schedule import TURBO_SCHEDULER_CONFIG

TIERS = {
    "simple": "一只黄色的小猫坐在草地上",
    "medium": "一位穿着汉服的女孩站在樱花树下，阳光洒落，写实风格",
    "complex": "广告牌上写着“新品上市”，背景是未来城市夜景，霓虹灯闪烁，赛博朋克风格",
}
STEPS = 8
STAGES = ("encode", "denoise", "decode", "total")


class StageClock:
    """Brackets each stage with events recorded by module hooks (CUDA events on a GPU, host clocks on
    the CPU): text encoder call, first transformer call to last, VAE decode."""

    def __init__(self, model: LoadedModel) -> None:
        self.cuda = model.placement.device.type == "cuda"
        self.marks: dict[str, Any] = {}
        self.transformer_calls = 0
        self._handles = [
            model.text_encoder.register_forward_pre_hook(lambda *_: self._mark("encode_start")),
            model.text_encoder.register_forward_hook(lambda *_: self._mark("encode_end")),
            model.transformer.register_forward_pre_hook(self._transformer_start),
            model.transformer.register_forward_hook(lambda *_: self._mark("denoise_end")),
        ]
        self._vae = model.vae
        self._decode = model.vae.decode

        def timed_decode(*args: Any, **kwargs: Any) -> Any:
            self._mark("decode_start", first=True)
            out = self._decode(*args, **kwargs)
            self._mark("decode_end")
            return out

        model.vae.decode = timed_decode

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._vae.decode = self._decode

    def _now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _mark(self, name: str, first: bool = False) -> None:
        if not (first and name in self.marks):
            self.marks[name] = self._now()

    def _transformer_start(self, *_: Any) -> None:
        self.transformer_calls += 1
        self._mark("denoise_start", first=True)

    def _between(self, start: str, end: str) -> float:
        if start not in self.marks or end not in self.marks:
            return 0.0  # the stage did not run (a cached prompt)
        if self.cuda:
            return float(self.marks[start].elapsed_time(self.marks[end])) / 1000
        return float(self.marks[end] - self.marks[start])

    @contextlib.contextmanager
    def run(self) -> Iterator[dict[str, float]]:
        self.marks.clear()
        self.transformer_calls = 0
        times: dict[str, float] = {}
        self._sync()
        started = time.perf_counter()
        yield times
        self._sync()
        times["total"] = time.perf_counter() - started
        for stage in ("encode", "denoise", "decode"):
            times[stage] = self._between(f"{stage}_start", f"{stage}_end")

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


@dataclass
class Row:
    name: str
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # tier -> stage -> seconds
    peak_memory: int = 0
    transformer_calls: int = 0

    def median(self, stage: str, tier: str | None = None) -> float:
        values = [v for t, s in self.samples.items() if tier in (None, t) for v in s[stage]]
        return statistics.median(values) if values else 0.0


def measure(
    name: str,
    model: LoadedModel,
    generate: Callable[[str, int], Any],
    runs: int,
    before_each: Callable[[], None] = lambda: None,
) -> Row:
    row = Row(name)
    clock = StageClock(model)
    cuda = model.placement.device.type == "cuda"
    try:
        for tier, prompt in TIERS.items():
            generate(prompt, 0)  # warm-up: kernels chosen, graphs compiled, allocator grown
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            row.samples[tier] = {stage: [] for stage in STAGES}
            for run in range(runs):
                before_each()
                with clock.run() as times:
                    generate(prompt, 1000 + run)
                for stage in STAGES:
                    row.samples[tier][stage].append(times[stage])
                row.transformer_calls = clock.transformer_calls
            if cuda:
                row.peak_memory = max(row.peak_memory, torch.cuda.max_memory_allocated())
    finally:
        clock.close()
    return row


def diffusers_pipeline(model: LoadedModel) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(TURBO_SCHEDULER_CONFIG),
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        transformer=model.transformer,
    )


def host_syncs_in_loop(engine: ZImageEngine, size: int) -> int | None:
    """Synchronisations CUDA's sync debug mode reports during one denoising loop (None on the CPU)."""
    if engine.device.type != "cuda":
        return None
    positive = engine.encode_prompt(TIERS["simple"])
    noise = engine.initial_noise([7], size, size)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            engine.denoise(noise, positive, steps=STEPS)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def attention_sweep(model: LoadedModel, size: int, repeats: int) -> dict[str, float]:
    """Seconds per transformer call for each attention backend installed here."""
    device = model.placement.device
    transformer = model.transformer
    latent = torch.randn(16, 1, size // 8, size // 8, device=device, dtype=model.placement.dtype)
    caption = torch.randn(32, transformer.config.cap_feat_dim, device=device, dtype=model.placement.dtype)
    timestep = torch.tensor([0.5], device=device)
    times: dict[str, float] = {}
    for backend in ATTENTION_PREFERENCE:
        if not attention_available(backend, device):
            continue
        transformer.set_attention_backend(backend)
        with torch.inference_mode():
            transformer([latent], timestep, [caption])
            samples = []
            for _ in range(repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                transformer([latent], timestep, [caption])
                if device.type == "cuda":
                    torch.cuda.synchronize()
                samples.append(time.perf_counter() - started)
        times[backend] = statistics.median(samples)
    transformer.set_attention_backend("native")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, runs=5)
    args = parser.parse_args()
    quiet_libraries()
    started = time.perf_counter()
    model = build_model(args)
    device = model.placement.device
    size = args.size
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "size": size,
        "steps": STEPS,
        "runs": args.runs,
        "tiny": args.tiny,
        "date": time.strftime("%Y-%m-%d"),
    }

    # The baseline first: the fast path changes the shared modules in place.
    pipe = diffusers_pipeline(model)
    pipe.set_progress_bar_config(disable=True)

    def baseline(prompt: str, seed: int) -> Any:
        generator = torch.Generator(device).manual_seed(seed)
        return pipe(prompt, height=size, width=size, num_inference_steps=STEPS, guidance_scale=0.0, generator=generator)

    rows = [measure("diffusers ZImagePipeline", model, baseline, args.runs)]
    print(f"baseline done ({time.perf_counter() - started:.0f}s)", flush=True)
    noise = torch.randn(1, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(7)).to(device)
    reference = {
        tier: pipe(
            prompt,
            height=size,
            width=size,
            num_inference_steps=STEPS,
            guidance_scale=0.0,
            latents=noise.clone(),
            output_type="latent",
        ).images.float()
        for tier, prompt in TIERS.items()
    }
    report["attention_sweep_s"] = attention_sweep(model, size, repeats=3)

    def engine_rows(engine: ZImageEngine, name: str, cached_too: bool) -> list[Row]:
        def generate(prompt: str, seed: int) -> Any:
            return engine.generate(GenerationParams(prompt, width=size, height=size, steps=STEPS, seed=seed))

        result = [measure(name, model, generate, args.runs, before_each=engine.clear_prompt_cache)]
        if cached_too:
            result.append(measure(f"{name}, prompt cached", model, generate, args.runs))
        return result

    eager = ZImageEngine(model, native_size=size, fast=FastPath(compile="off"))
    rows += engine_rows(eager, "engine, fast path without compile", cached_too=False)
    print(f"eager fast path done ({time.perf_counter() - started:.0f}s)", flush=True)
    fast = ZImageEngine(model, native_size=size, fast=FastPath(compile=args.compile))
    rows += engine_rows(fast, f"engine, fast path (compile {fast.fast_path['compile']})", cached_too=True)
    print(f"fast path done ({time.perf_counter() - started:.0f}s)", flush=True)

    errors = {}
    for tier, prompt in TIERS.items():
        latents = fast.denoise(noise.clone(), fast.encode_prompt(prompt), steps=STEPS)
        errors[tier] = relative_error(latents, reference[tier])
    report["latent_relative_error"] = errors
    report["host_syncs_in_step_loop"] = host_syncs_in_loop(fast, size)
    report["fast_path"] = fast.fast_path
    report["rows"] = [
        {
            "name": row.name,
            "median_s": {stage: row.median(stage) for stage in STAGES},
            "median_s_by_tier": {tier: {s: row.median(s, tier) for s in STAGES} for tier in TIERS},
            "samples_s": row.samples,
            "peak_memory_gib": row.peak_memory / 2**30,
            "transformer_calls": row.transformer_calls,
        }
        for row in rows
    ]
    base = rows[0].median("total")
    lines = [
        f"Card: {report['device']}; torch {report['torch']}; {size}x{size}, {STEPS} steps, "
        f"{args.runs} runs per tier after a warm-up; {report['date']}.",
        "",
        "| path | text encoding | denoising | VAE decode | end to end | vs diffusers | peak memory | calls |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        m = {stage: row.median(stage) for stage in STAGES}
        lines.append(
            f"| {row.name} | {m['encode'] * 1000:.1f} ms | {m['denoise'] * 1000:.1f} ms | "
            f"{m['decode'] * 1000:.1f} ms | {m['total']:.3f} s | {base / m['total']:.2f}x | "
            f"{row.peak_memory / 2**30:.1f} GiB | {row.transformer_calls} |"
        )
    lines += [
        "",
        "Per tier, end to end (median): "
        + "; ".join(f"{row.name}: " + ", ".join(f"{t} {row.median('total', t):.3f} s" for t in TIERS) for row in rows),
        "",
        "Final latents, fast path vs diffusers (same noise), relative error: "
        + ", ".join(f"{t} {e:.2e}" for t, e in errors.items())
        + f" (limit 1e-2: {'pass' if max(errors.values()) < 1e-2 else 'FAIL'})",
        f"Host synchronisations inside the step loop: {report['host_syncs_in_step_loop']}",
        "Attention backends, one transformer call: "
        + ", ".join(f"{b} {t * 1000:.1f} ms" for b, t in report["attention_sweep_s"].items()),
        f"Fast path: {fast.fast_path}",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_bench.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    (args.out / "gpu_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
