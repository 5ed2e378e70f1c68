"""Z-Image-Turbo at full size on one GPU: the engine's fast path against diffusers' ZImagePipeline.

    python benchmarks/gpu_bench.py [--runs 5] [--size 1024] [--out DIR]      # on a CUDA GPU
    python benchmarks/gpu_bench.py --tiny --size 64 --runs 2                 # the same code on the CPU

Builds Turbo's real architecture with random weights on the device (the same work per image as the
real weights; nothing to download), then, for the field report's three prompt tiers, runs a warm-up
and `--runs` timed generations at 8 steps of:
1. diffusers' own `ZImagePipeline` (bf16, guidance 0, its default attention): the baseline;
2. the engine with the fast path but no compile (attention backend, no host syncs, channels-last VAE);
3. the engine with the whole fast path (plus regional torch.compile), prompt cache cleared each run;
4. the same with the prompt cached (a repeated prompt, as a server sees them);
5. the engine without compile and with an FP8 text encoder (`fp8_e4m3fn_fast` projections), beside row 2
   and measured before anything is compiled (its text encoding time is the comparison).
Each stage (text encoding, denoising, VAE decoding) is timed the same way for all of them: CUDA events
recorded by hooks on the modules, so no extra synchronisation enters the timed code. Peak memory is
read per row. In the same run it checks that the fast path's final latents match the baseline's (same
noise, relative error < 1e-2), that the step loop makes no host synchronisation (CUDA's sync debug
mode), and that 8 steps make 8 transformer calls; it times one transformer call per attention backend
installed. Prints a table and writes `gpu_bench.json` and `gpu_bench.md` under `--out`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from gpu_common import build_model, device_name, parse_arguments, relative_error

from zimage_serve.engine import FastPath, GenerationParams, ZImageEngine
from zimage_serve.engine.fastpath import ATTENTION_PREFERENCE, attention_available
from zimage_serve.engine.fp8 import quantise_text_encoder
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


def guarded(what: str, check: Callable[[], Any]) -> Any:
    """One optional check: a failure is recorded in the report instead of losing the rows measured so far."""
    try:
        return check()
    except Exception as exc:  # any failure of a side check is a result to report
        print(f"{what} failed: {type(exc).__name__}: {exc}", flush=True)
        return f"failed: {type(exc).__name__}: {str(exc)[:300]}"


def row_summary(row: Row) -> dict[str, Any]:
    return {
        "name": row.name,
        "median_s": {stage: row.median(stage) for stage in STAGES},
        "median_s_by_tier": {tier: {s: row.median(s, tier) for s in STAGES} for tier in TIERS},
        "samples_s": row.samples,
        "peak_memory_gib": row.peak_memory / 2**30,
        "transformer_calls": row.transformer_calls,
    }


def table(report: dict[str, Any], rows: list[Row]) -> list[str]:
    base = rows[0].median("total")
    lines = [
        f"Card: {report['device']}; torch {report['torch']}; {report['size']}x{report['size']}, {STEPS} steps, "
        f"{report['runs']} runs per tier after a warm-up; {report['date']}.",
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
    ]
    errors = report.get("latent_relative_error")
    if isinstance(errors, dict):
        lines += [
            "",
            "Final latents, fast path vs diffusers (same noise), relative error: "
            + ", ".join(f"{t} {e:.2e}" for t, e in errors.items())
            + f" (limit 1e-2: {'pass' if max(errors.values()) < 1e-2 else 'FAIL'})",
        ]
    if "host_syncs_in_step_loop" in report:
        lines.append(f"Host synchronisations inside the step loop: {report['host_syncs_in_step_loop']}")
    sweep = report.get("attention_sweep_s")
    if isinstance(sweep, dict):
        lines.append(
            "Attention backends, one transformer call: " + ", ".join(f"{b} {t * 1000:.1f} ms" for b, t in sweep.items())
        )
    if "fast_path" in report:
        lines.append(f"Fast path: {report['fast_path']}")
    fp8_text = report.get("fp8_text_encoder_embedding_error")
    if isinstance(fp8_text, dict):
        lines.append(
            "FP8 text encoder, embeddings against bf16's, relative error: "
            + ", ".join(f"{t} {e:.2e}" for t, e in fp8_text.items())
        )
    return lines


def save(out: Path, report: dict[str, Any], rows: list[Row]) -> list[str]:
    """Write what is measured so far (a run cut short by its time limit still leaves its rows)."""
    report["rows"] = [row_summary(row) for row in rows]
    lines = table(report, rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_bench.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    (out / "gpu_bench.md").write_text("\n".join(lines) + "\n")
    return lines


def main() -> None:
    args = parse_arguments(__doc__.splitlines()[0], runs=5)
    started = time.perf_counter()
    model = build_model(args)
    device = model.placement.device
    size = args.size
    report: dict[str, Any] = {
        "device": device_name(device),
        "torch": torch.__version__,
        "size": size,
        "steps": STEPS,
        "runs": args.runs,
        "tiny": args.tiny,
        "date": time.strftime("%Y-%m-%d"),
    }
    rows: list[Row] = []

    def done(new_rows: list[Row], what: str) -> None:
        rows.extend(new_rows)
        for row in new_rows:
            print(f"{row.name}: {row.median('total'):.3f} s end to end, denoise {row.median('denoise'):.3f} s")
        save(args.out, report, rows)
        print(f"{what} done ({time.perf_counter() - started:.0f}s)", flush=True)

    # The baseline first: the fast path changes the shared modules in place.
    pipe = diffusers_pipeline(model)
    pipe.set_progress_bar_config(disable=True)

    def baseline(prompt: str, seed: int) -> Any:
        generator = torch.Generator(device).manual_seed(seed)
        return pipe(prompt, height=size, width=size, num_inference_steps=STEPS, guidance_scale=0.0, generator=generator)

    done([measure("diffusers ZImagePipeline", model, baseline, args.runs)], "baseline")
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
    report["attention_sweep_s"] = guarded("attention sweep", lambda: attention_sweep(model, size, repeats=3))

    def engine_rows(engine: ZImageEngine, name: str, cached_too: bool) -> list[Row]:
        def generate(prompt: str, seed: int) -> Any:
            return engine.generate(GenerationParams(prompt, width=size, height=size, steps=STEPS, seed=seed))

        result = [measure(name, model, generate, args.runs, before_each=engine.clear_prompt_cache)]
        if cached_too:
            result.append(measure(f"{name}, prompt cached", model, generate, args.runs))
        return result

    eager = ZImageEngine(model, native_size=size, fast=FastPath(compile="off"))
    done(engine_rows(eager, "engine, fast path without compile", cached_too=False), "eager fast path")

    def fp8_text_encoder() -> dict[str, float]:
        """A lever for the text encoder's time: its projections in FP8 (FP8 matmuls on CUDA). A row beside
        the eager one, measured before anything is compiled (compiling changes the shared transformer in
        place), and the embeddings' error against bf16's. Its peak memory holds both encoders."""
        encoder = copy.deepcopy(model.text_encoder)
        quantise_text_encoder(encoder, "fp8_e4m3fn_fast")
        quantised = replace(model, text_encoder=encoder)
        engine = ZImageEngine(quantised, native_size=size, fast=FastPath(compile="off"))

        def generate(prompt: str, seed: int) -> Any:
            return engine.generate(GenerationParams(prompt, width=size, height=size, steps=STEPS, seed=seed))

        row = measure("engine, fast path without compile, FP8 text encoder", quantised, generate, args.runs,
                      before_each=engine.clear_prompt_cache)  # fmt: skip
        done([row], "FP8 text encoder")
        errors = {
            tier: relative_error(engine.encode_prompt(prompt).embeds, eager.encode_prompt(prompt).embeds)
            for tier, prompt in TIERS.items()
        }
        return errors

    report["fp8_text_encoder_embedding_error"] = guarded("FP8 text encoder", fp8_text_encoder)

    fast = ZImageEngine(model, native_size=size, fast=FastPath(compile=args.compile))
    report["fast_path"] = fast.fast_path
    done(engine_rows(fast, f"engine, fast path (compile {fast.fast_path['compile']})", cached_too=True), "fast path")

    def latent_errors() -> dict[str, float]:
        # The engine answers raw VAE latents; diffusers' "latent" output is the network's space.
        config = model.vae.config
        scale, shift = float(config.scaling_factor), float(config.shift_factor or 0.0)

        def network_space(prompt: str) -> Any:
            return (fast.denoise(noise.clone(), fast.encode_prompt(prompt), steps=STEPS) - shift) * scale

        return {tier: relative_error(network_space(prompt), reference[tier]) for tier, prompt in TIERS.items()}

    report["latent_relative_error"] = guarded("latent check", latent_errors)
    report["host_syncs_in_step_loop"] = guarded("sync check", lambda: host_syncs_in_loop(fast, size))

    print("\n".join(save(args.out, report, rows)))
    print(f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
