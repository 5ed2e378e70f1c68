"""`zimage nano train | eval`: build the built-in model and measure what its images show."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from zimage_serve.cli.common import console, console_err
from zimage_serve.nano.default import SHIPPED, default_model

app = typer.Typer(
    help="Train and evaluate zimage-nano, the built-in model.", no_args_is_help=True, rich_markup_mode=None
)


@app.command()
def train(
    work_dir: Annotated[Path, typer.Option(help="Checkpoints and caches (resumable)")] = Path("build/nano"),
    output: Annotated[Path, typer.Option(help="Where the finished model folder goes")] = SHIPPED,
    seed: Annotated[int, typer.Option(help="Seed for data, initialisation and noise")] = 0,
    steps: Annotated[int | None, typer.Option(help="Diffusion training steps [default: the recipe's]")] = None,
    vae_steps: Annotated[int | None, typer.Option(help="VAE training steps [default: the recipe's]")] = None,
    restart_steps: Annotated[
        int | None, typer.Option(help="Steps of the warm-restart cycle after --steps [default: the recipe's]")
    ] = None,
    compile: Annotated[
        bool, typer.Option(help="torch.compile the transformer blocks (needs a C++ compiler; same recipe, other bits)")
    ] = True,
) -> None:
    """Train the tokenizer, VAE, text encoder and transformer from scratch; write a diffusers folder."""
    from dataclasses import replace

    from zimage_serve.nano.train import Recipe, Trainer

    recipe = Recipe(seed=seed, compile=compile)
    if steps is not None:
        recipe = replace(recipe, steps=steps)
    if vae_steps is not None:
        recipe = replace(recipe, vae_steps=vae_steps)
    if restart_steps is not None:
        recipe = replace(recipe, restart_steps=restart_steps)
    started = time.perf_counter()
    Trainer(work_dir, recipe, log=lambda line: console_err.print(line, highlight=False)).run(output)
    console.print(f"{output} ({(time.perf_counter() - started) / 60:.1f} min)")


@app.command("eval")
def evaluate_command(
    model: Annotated[Path | None, typer.Option("--model", "-m", help="Model to check [default: built-in]")] = None,
    count: Annotated[int, typer.Option(help="Images to generate (half English, half Chinese)")] = 200,
    seed: Annotated[int, typer.Option(help="Seed for the scenes, prompts and image seeds")] = 0,
    steps: Annotated[int, typer.Option(help="Sampling steps")] = 8,
    save: Annotated[Path | None, typer.Option(help="Folder to write every image to, marked ok / x")] = None,
    minimum: Annotated[float, typer.Option(help="Exit 1 if any attribute/language is below this")] = 0.0,
) -> None:
    """Generate held-out scenes and check each image's colours, shape and position by program."""
    from rich.progress import Progress
    from rich.table import Table

    from zimage_serve.engine import open_engine
    from zimage_serve.nano.checker import ATTRIBUTES
    from zimage_serve.nano.evaluate import evaluate
    from zimage_serve.nano.scenes import LANGUAGES

    if count < 2:
        raise typer.BadParameter("needs at least 2 images (one per language)", param_hint="--count")
    engine = open_engine(model or default_model(), device="cpu")
    with Progress(console=console_err, transient=True) as bar:
        task = bar.add_task("generating", total=count)
        report = evaluate(engine, count, seed, steps, save, lambda done, _: bar.update(task, completed=done))
    table = Table(title=f"{engine.model.sources.name}: {count} held-out images, {steps} steps, seed {seed}")
    table.add_column("attribute")
    for language in (*LANGUAGES, "all"):
        table.add_column(language, justify="right")
    for attribute in ATTRIBUTES:
        row = [f"{report.accuracy(attribute, lang):.1%}" for lang in LANGUAGES]
        table.add_row(attribute, *row, f"{report.accuracy(attribute):.1%}")
    table.add_row("all four", *[f"{report.all_correct(lang):.1%}" for lang in LANGUAGES], f"{report.all_correct():.1%}")
    console.print(table)
    if report.worst() < minimum:
        console_err.print(f"[red]lowest accuracy {report.worst():.1%} is below {minimum:.1%}[/]")
        raise typer.Exit(1)
