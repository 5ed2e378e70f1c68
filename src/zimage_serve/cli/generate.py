"""`zimage generate`: one prompt to PNG files, with a progress bar."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from zimage_serve.cli.common import (
    AttentionOption,
    CompileOption,
    Int8MatmulOption,
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
from zimage_serve.cli.extras import distill_lora, find_controlnet, parsed_lora
from zimage_serve.engine.names import CANNY_TEMPLATE_HIGH, CANNY_TEMPLATE_LOW
from zimage_serve.engine.variants import DISTILL, DISTILL_STRENGTH
from zimage_serve.errors import InvalidParameterError, ZImageError

if TYPE_CHECKING:
    import torch
    from PIL import Image

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
        str,
        typer.Option(
            help="auto (from the names), base (Z-Image), turbo, or distill (the base model with alibaba-pai's "
            "distill LoRA, found in the models folder's loras/: 8 steps, cfg 1): the default steps and guidance"
        ),
    ] = "auto",
    lora: Annotated[
        list[str] | None,
        typer.Option(metavar="PATH[:STRENGTH]", help="A LoRA to apply (repeatable; strength 1 when left out)"),
    ] = None,
    shift: Annotated[float, typer.Option(help="Flow shift of the sigma schedule")] = 3.0,
    batch: Annotated[int, typer.Option("--batch", "-n", help="Images to make; image i uses seed + i")] = 1,
    model: ModelOption = None,
    text_encoder: TextEncoderOption = None,
    vae: VaeOption = None,
    tokenizer: TokenizerOption = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, bf16, fp16 or fp32 (the VAE never runs in fp16)")] = "auto",
    memory_mode: Annotated[str, typer.Option(help="auto, gpu or smart")] = "auto",
    attention: AttentionOption = "auto",
    compile: CompileOption = "auto",
    int8_matmul: Int8MatmulOption = "auto",
    weight_dtype: Annotated[
        str,
        typer.Option(help="Transformer weights: default, fp8_e4m3fn, fp8_e5m2 (FP8 storage) or fp8_e4m3fn_fast"),
    ] = "default",
    control_image: Annotated[
        Path | None,
        typer.Option(help="Steer the layout with a Fun ControlNet: a picture to take edges from, or a ready map"),
    ] = None,
    control_type: Annotated[
        str,
        typer.Option(
            help="canny (edges are detected in --control-image), raw (it is the map already) or tile (a small "
            "picture a Tile ControlNet re-details: upscaled with Lanczos to the size made, twice its own by default)"
        ),
    ] = "canny",
    control_strength: Annotated[
        float, typer.Option(help="How strongly the ControlNet steers (0 is not at all)")
    ] = 0.75,
    controlnet: Annotated[
        Path | None,
        typer.Option(
            help="A Fun ControlNet Union file or diffusers folder [default: the one in the models' model_patches/]"
        ),
    ] = None,
    canny_low: Annotated[
        float, typer.Option(help="Canny's low threshold (the official template's)")
    ] = CANNY_TEMPLATE_LOW,
    canny_high: Annotated[
        float, typer.Option(help="Canny's high threshold (the official template's)")
    ] = CANNY_TEMPLATE_HIGH,
    image: Annotated[
        Path | None, typer.Option(help="Inpaint: the picture to change, where --mask is white; the rest is kept")
    ] = None,
    mask: Annotated[
        Path | None, typer.Option(help="Inpaint: white where --image is regenerated, black where kept")
    ] = None,
) -> None:
    """Generate images from a prompt and write them as PNG files."""
    from zimage_serve.engine.params import MAX_SEED, GenerationParams  # with the command, not at `zimage --help`
    from zimage_serve.png import png_info, save_png

    fast = fast_path(attention, compile, device, int8_matmul)
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
    steering = _pictures(control_image, control_type, control_strength, canny_low, canny_high, image, mask)
    if steering.size is not None and (width is None or height is None):
        width, height = width or steering.size[0], height or steering.size[1]
        params = replace(params, width=width, height=height)
        params.validate()
    model_path, label = chosen_model(model)
    if label:
        console_err.print(f"[yellow]model:[/] {label}")
    loras = [parsed_lora(text) for text in lora or []]
    if variant == DISTILL and not any("distill" in path.name.lower() for path, _ in loras):
        loras = [(distill_lora(model_path), DISTILL_STRENGTH), *loras]  # the recipe's, and any others given
    if variant == DISTILL and model_path.is_file():
        from zimage_serve.engine.variants import TURBO, detect_variant

        if detect_variant(model_path) == TURBO:
            console_err.print("[yellow]warning:[/] the distill LoRA is made for the base model (Z-Image)")
    applied = [(_loaded_lora(path), strength) for path, strength in loras]  # before the model: a bad file is quick
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
    assert params.width is not None and params.height is not None
    if control_type == "tile" and steering.control is not None:  # upscale, then control
        from zimage_serve.engine.resize import scale_image

        upscaled = scale_image(steering.control, params.width, params.height, "lanczos", "disabled")
        steering = replace(steering, control=upscaled)
    inputs = None
    if steering.control is not None or steering.image is not None:
        net = None
        if steering.control is not None or controlnet is not None:
            path = controlnet or find_controlnet(model_path)
            net = engine.load_controlnet(path)
            console_err.print(f"[cyan]controlnet:[/] {path} — {net.variant.describe()}", highlight=False)
        from zimage_serve.engine.pipeline import ImageInputs

        inputs = ImageInputs(net, steering.control, control_strength, steering.image, steering.mask)
    for path, strength in loras:
        console_err.print(f"[cyan]lora:[/] {path} at {strength:g}", highlight=False)
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

        result = engine.generate(params, on_step=advance, inputs=inputs, loras=applied)
    for warning in result.warnings:
        console_err.print(f"[yellow]warning:[/] {warning}", highlight=False)

    base = result.params.to_metadata() | {"model": engine.model.sources.name}
    paths = _output_paths(output, result.seeds)
    for picture, image_seed, path in zip(result.images, result.seeds, paths, strict=True):
        save_png(picture, path, png_info(base | {"seed": image_seed, "batch_size": 1}))
        console.print(str(path), highlight=False)
    t = result.timings
    console_err.print(
        f"seed {result.seeds[0]}, {result.params.width}x{result.params.height}, {params.steps} steps: "
        f"encode {t['encode']:.2f}s, denoise {t['denoise']:.2f}s, decode {t['decode']:.2f}s, "
        f"total {t['total']:.2f}s",
        highlight=False,
    )


@dataclass(frozen=True)
class _Pictures:
    control: torch.Tensor | None = None
    image: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    size: tuple[int, int] | None = None  # the size they suggest, in multiples of 16


def _pictures(
    control_image: Path | None,
    control_type: str,
    strength: float,
    low: float,
    high: float,
    image: Path | None,
    mask: Path | None,
) -> _Pictures:
    """The steering pictures read and checked before any model loads; each error names its option."""
    if control_type not in CONTROL_TYPES:
        listed = ", ".join(CONTROL_TYPES)
        raise typer.BadParameter(f"{control_type!r} is not one of {listed}", param_hint="--control-type")
    if not (math.isfinite(strength) and -10 <= strength <= 10):
        raise typer.BadParameter(f"{strength} is outside -10..10", param_hint="--control-strength")
    if (image is None) != (mask is None):
        raise typer.BadParameter(
            "inpainting needs both --image and --mask", param_hint="--mask" if image else "--image"
        )
    if control_image is None and image is None:
        return _Pictures()
    from zimage_serve.engine.pixels import from_pil

    control = None
    if control_image is not None:
        control = from_pil(_read_picture(control_image, "--control-image"))
        if control_type == "canny":
            try:
                from zimage_serve.engine.edges import canny

                control = canny(control, low, high)
            except ValueError as exc:
                raise typer.BadParameter(str(exc), param_hint="--canny-low") from exc
    source = None if image is None else from_pil(_read_picture(image, "--image"))
    regenerate = None
    if mask is not None:
        regenerate = from_pil(_read_picture(mask, "--mask")).mean(-1)  # its brightness: white = regenerate
    first = source if source is not None else control
    assert first is not None
    grow = 2 if control_type == "tile" and source is None else 1  # a tile upscale makes it twice as large
    return _Pictures(control, source, regenerate, _suggested_size(first.shape[2] * grow, first.shape[1] * grow))


def _read_picture(path: Path, option: str) -> Image.Image:
    from PIL import Image

    from zimage_serve.image_safety import ImageRefused, facts, refusing

    try:
        with refusing(option), Image.open(path) as opened:
            facts(opened, option, 64 * 1024 * 1024)
            opened.load()
            return opened.copy()
    except FileNotFoundError as exc:
        raise typer.BadParameter(f"{path} does not exist", param_hint=option) from exc
    except (ImageRefused, OSError) as exc:
        raise typer.BadParameter(f"{path}: {exc}", param_hint=option) from exc


CONTROL_TYPES = ("canny", "raw", "tile")
TRAINED_LONG_SIDE = 2048  # the 6B models' largest trained side: a picture's size is a suggestion, kept to it


def _suggested_size(width: int, height: int) -> tuple[int, int]:
    """A picture's size in whole steps, its long side at most 2048 (the aspect ratio kept): within the
    sides and pixels every route allows (zimage_serve/limits.py)."""
    from zimage_serve.limits import MIN_SIDE, SIDE_STEP

    factor = min(1.0, TRAINED_LONG_SIDE / max(width, height))
    fit = [max(MIN_SIDE, int(side * factor) // SIDE_STEP * SIDE_STEP) for side in (width, height)]
    return fit[0], fit[1]


def _loaded_lora(path: Path) -> Any:
    from zimage_serve.engine.lora import load_lora

    try:
        return load_lora(path)
    except ZImageError as exc:
        raise typer.BadParameter(str(exc), param_hint="--lora") from exc


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
