"""`zimage generate`: one prompt to PNG files, with a progress bar."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from zimage_serve.cli.common import (
    AttentionOption,
    CompileOption,
    ModelOption,
    TextEncoderOption,
    TokenizerOption,
    VaeOption,
    chosen_model,
    console,
    console_err,
    fast_path,
    option_errors,
)
from zimage_serve.errors import InvalidParameterError

if TYPE_CHECKING:
    from zimage_serve.engine.pipeline import StepInfo


def generate(
    prompt: Annotated[str, typer.Argument(help="What the image should show (English or Chinese)")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="PNG file to write")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed [default: random]")] = None,
    steps: Annotated[int | None, typer.Option(help="Sampling steps [default: 8 for Turbo, 50 for Z-Image]")] = None,
    width: Annotated[int | None, typer.Option(help="Multiple of 16 [default: the model's native size]")] = None,
    height: Annotated[int | None, typer.Option(help="Multiple of 16 [default: the model's native size]")] = None,
    guidance: Annotated[
        float | None,
        typer.Option(
            help="Guidance scale, diffusers' (ComfyUI's cfg = guidance + 1; 0 is off) [default: 0 for "
            "Turbo, 4 for Z-Image]"
        ),
    ] = None,
    negative: Annotated[str, typer.Option("--negative", help="Negative prompt (with --guidance > 0)")] = "",
    cfg_normalization: Annotated[
        float, typer.Option(help="Cap the guided prediction's norm at this many times the positive's (0 off)")
    ] = 0.0,
    cfg_truncation: Annotated[
        float, typer.Option(help="Guide only while 1 - sigma is at most this (1 guides every step)")
    ] = 1.0,
    variant: Annotated[
        str, typer.Option(help="auto (from the names), base (Z-Image) or turbo: the default steps and guidance")
    ] = "auto",
    shift: Annotated[float, typer.Option(help="Flow shift of the sigma schedule")] = 3.0,
    batch: Annotated[int, typer.Option("--batch", "-n", help="Images to make; image i uses seed + i")] = 1,
    model: ModelOption = None,
    text_encoder: TextEncoderOption = None,
    vae: VaeOption = None,
    tokenizer: TokenizerOption = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, bf16, fp16 or fp32 (the VAE never runs in fp16)")] = "auto",
    memory_mode: Annotated[str, typer.Option(help="auto, gpu, model or sequential")] = "auto",
    attention: AttentionOption = "auto",
    compile: CompileOption = "auto",
    weight_dtype: Annotated[
        str,
        typer.Option(help="Transformer weights: default, fp8_e4m3fn, fp8_e5m2 (FP8 storage) or fp8_e4m3fn_fast"),
    ] = "default",
) -> None:
    """Generate images from a prompt and write them as PNG files."""
    from zimage_serve.engine.params import MAX_SEED, GenerationParams  # with the command, not at `zimage --help`
    from zimage_serve.png import png_info, save_png

    fast = fast_path(attention, compile, device)
    with option_errors():
        from zimage_serve.engine.fp8 import check_weight_dtype

        check_weight_dtype(weight_dtype)
    params = GenerationParams(
        prompt=prompt,
        negative_prompt=negative,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=guidance,
        cfg_normalization=cfg_normalization,
        cfg_truncation=cfg_truncation,
        shift=shift,
        seed=secrets.randbelow(MAX_SEED) if seed is None else seed,
        batch_size=batch,
    )
    params.validate()  # before the model loads: a typo should not cost a load
    if variant != "auto":
        from zimage_serve.engine.variants import check_variant

        check_variant(variant)
    if output is not None and output.suffix.lower() != ".png":
        raise InvalidParameterError("output", f"{output} must end in .png")
    model_path, label = chosen_model(model)
    if label:
        console_err.print(f"[yellow]model:[/] {label}")
    from zimage_serve.engine import open_engine

    engine = open_engine(
        model_path,
        text_encoder=text_encoder,
        vae=vae,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        memory_mode=memory_mode,
        fast=fast,
        weight_dtype=weight_dtype,
        variant=None if variant == "auto" else variant,
    )
    params = engine.resolve(params)
    console_err.print(
        f"[cyan]{engine.model.sources.name}[/] ({engine.model.sources.layout}, {engine.variant}): "
        f"{engine.model.placement.describe()}; {params.steps} steps, guidance {params.guidance_scale:g}",
        highlight=False,
    )

    from zimage_serve.engine.trained_size import declared_size, size_warning

    trained = declared_size(model_path) if model_path.is_dir() else None
    side = engine.native_size
    warning = size_warning(engine.model.sources.name, trained, params.width or side, params.height or side)
    if warning is not None:
        console_err.print(f"[yellow]warning:[/] {warning}", highlight=False)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console_err,
        transient=True,
    ) as progress:
        task = progress.add_task("denoising", total=params.steps)

        def advance(step: StepInfo) -> None:
            progress.update(task, completed=step.step)

        result = engine.generate(params, on_step=advance)
    for warning in result.warnings:
        console_err.print(f"[yellow]warning:[/] {warning}", highlight=False)

    base = result.params.to_metadata() | {"model": engine.model.sources.name}
    paths = _output_paths(output, result.seeds)
    for image, image_seed, path in zip(result.images, result.seeds, paths, strict=True):
        save_png(image, path, png_info(base | {"seed": image_seed, "batch_size": 1}))
        console.print(str(path), highlight=False)
    t = result.timings
    console_err.print(
        f"seed {result.seeds[0]}, {result.params.width}x{result.params.height}, {params.steps} steps: "
        f"encode {t['encode']:.2f}s, denoise {t['denoise']:.2f}s, decode {t['decode']:.2f}s, "
        f"total {t['total']:.2f}s",
        highlight=False,
    )


def _output_paths(output: Path | None, seeds: list[int]) -> list[Path]:
    if output is not None:
        if len(seeds) == 1:
            return [output]
        return [output.with_name(f"{output.stem}_{i:02d}{output.suffix}") for i in range(len(seeds))]
    folder = Path("outputs")
    return [_free_name(folder, f"zimage_{s}") for s in seeds]


def _free_name(folder: Path, stem: str) -> Path:
    counter = 1
    while (path := folder / f"{stem}_{counter:05d}.png").exists():
        counter += 1
    return path
