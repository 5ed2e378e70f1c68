"""`zimage models`: what model files are where, why any of them cannot be used, and pulling the official ones.

`zimage models [PATHS]` lists, as it always has; `zimage models pull NAME` downloads. Both live in one group
whose first word picks the subcommand, and anything else (a path) goes to the listing."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import filesize
from rich.table import Table
from typer.core import TyperGroup

from zimage_serve.catalogue import CATALOGUE, LAYOUTS, Entry, approx_size
from zimage_serve.cli.common import TokenizerOption, console, console_err
from zimage_serve.engine.names import ROOT_FOLDERS
from zimage_serve.errors import ZImageError
from zimage_serve.settings import MODEL_ENV, MODELS_ENV, default_models_dir

LIST = "list"


class _ModelsGroup(TyperGroup):
    """A group whose default subcommand is the listing: `zimage models` and `zimage models PATH...` keep
    working as before the group existed; a path named like a subcommand can be written ./pull."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # Any: click's or typer's own copy of it
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = [LIST, *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_ModelsGroup,
    help="List the models found and check each (the default: zimage models [PATHS]); pull the official ones.",
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    subcommand_metavar="[COMMAND] [ARGS]...",
)


@dataclass(frozen=True)
class Finding:
    path: Path
    kind: str
    size: int
    status: str  # "usable" or the reason it is not


@app.command(LIST)
def models(
    paths: Annotated[list[Path] | None, typer.Argument(help="Folders or files to inspect")] = None,
    tokenizer: TokenizerOption = None,
) -> None:
    """List the models found (the built-in zimage-nano, $ZIMAGE_MODEL, $ZIMAGE_MODELS, the default models
    folder, or PATHS) and check each."""
    findings = [f for target in paths for f in inspect(target, tokenizer)] if paths else _default_findings(tokenizer)
    if not console.is_terminal:  # piped: one tab-separated line per finding, nothing wrapped (rich would expand tabs)
        for f in findings:
            typer.echo("\t".join((str(f.path), f.kind, _size(f.size), f.status)))
        return
    table = Table("path", "kind", "size", "status", show_lines=False)
    for f in findings:
        style = "green" if f.status == "usable" else "red"
        table.add_row(str(f.path), f.kind, _size(f.size), f"[{style}]{f.status}[/]")
    console.print(table)


def _default_findings(tokenizer: Path | None) -> list[Finding]:
    """What the commands use when told nothing: the built-in model by name, the configured folders, and
    the default models folder (said to be empty rather than left out, so its place is known)."""
    from zimage_serve.workflow.folders import builtin_models

    findings = [_whole_model(path, tokenizer, f"built-in model {name}") for name, path in builtin_models().items()]
    if not findings:
        from zimage_serve.nano.default import SHIPPED

        findings.append(Finding(SHIPPED, "built-in model zimage-nano", 0, "missing from this installation"))
    if os.environ.get(MODEL_ENV):
        findings += inspect(Path(os.environ[MODEL_ENV]), tokenizer)
    roots = [Path(p) for p in os.environ.get(MODELS_ENV, "").split(os.pathsep) if p]
    for root in roots:
        findings += inspect(root, tokenizer)
    default = default_models_dir()
    if roots:  # the commands read these instead of the default folder
        return findings
    if default.is_dir():
        return findings + inspect(default, tokenizer)
    status = f"not created yet: zimage models pull NAME fills it ({', '.join(CATALOGUE)})"
    return [*findings, Finding(default, "default models folder", 0, status)]


def inspect(target: Path, tokenizer: Path | None = None) -> list[Finding]:
    from zimage_serve.engine import layouts

    if not target.exists():
        return [Finding(target, "?", 0, "not found")]
    if target.is_dir() and (target / "model_index.json").exists():
        return [_whole_model(target, tokenizer, "diffusers folder")]
    if target.is_dir():
        findings = [_file(file) for kind in ROOT_FOLDERS for file in layouts.root_files(target, kind)]
        if any(f.kind == "transformer" and f.status == "usable" for f in findings):
            findings.append(_whole_model(target, tokenizer, "ComfyUI models folder"))
        # diffusers folders a models folder holds whole (`zimage models pull --layout diffusers` puts them here)
        for index in sorted((target / "checkpoints").glob("*/model_index.json")):
            findings.append(_whole_model(index.parent, tokenizer, "diffusers folder"))
        return findings or [Finding(target, "?", 0, "no model files found here")]
    return [_file(target)]


def _whole_model(path: Path, tokenizer: Path | None, kind: str) -> Finding:
    from zimage_serve.engine import layouts, loader

    """Everything a generation needs, found and fitting together (tokenizer included)."""
    try:
        sources = layouts.resolve(path, tokenizer=tokenizer)
        prepared = loader.prepare_all(sources)
        loader.load_tokenizer(sources.tokenizer, prepared["text_encoder"].config["vocab_size"])
        size = sum(p.nbytes for p in prepared.values())
        return Finding(path, f"{kind} (complete model)", size, "usable")
    except ZImageError as exc:
        return Finding(path, f"{kind} (complete model)", 0, str(exc))


def _file(path: Path) -> Finding:
    from zimage_serve.engine import components, layouts
    from zimage_serve.engine.components import ComponentSource

    size = path.stat().st_size if path.is_file() else 0
    try:
        kind = layouts.classify(path)
    except ZImageError as exc:
        return Finding(path, "?", size, str(exc))
    if kind == "lora":
        return Finding(path, "LoRA", size, "usable by workflows (LoraLoader)")
    if kind == "model_patch":
        return _model_patch(path, size)
    if kind == "unknown":
        return Finding(path, "unknown", size, "not a Z-Image component (tensor names not recognised)")
    try:
        components.prepare(ComponentSource(kind, path))  # type: ignore[arg-type]
    except ZImageError as exc:
        return Finding(path, kind, size, str(exc))
    return Finding(path, kind, size, "usable")


def _model_patch(path: Path, size: int) -> Finding:
    from zimage_serve.engine.checkpoint import Checkpoint
    from zimage_serve.engine.controlnet import detect_variant

    try:
        variant = detect_variant(Checkpoint.open(path))
    except ZImageError as exc:
        return Finding(path, "ControlNet", size, str(exc))
    return Finding(path, "ControlNet", size, f"usable by workflows (ModelPatchLoader): {variant.describe()}")


def _size(nbytes: int) -> str:
    return filesize.decimal(nbytes) if nbytes > 0 else ""


@app.command("pull")
def pull(
    names: Annotated[
        list[str] | None,
        typer.Argument(help=f"The models to download: {', '.join(CATALOGUE)}", metavar="NAME", show_default=False),
    ] = None,
    layout: Annotated[
        str,
        typer.Option(
            metavar="comfy|diffusers",
            help="comfy: ComfyUI's split files, named as the official templates name them, in diffusion_models/, "
            "text_encoders/ and vae/; diffusers: the official diffusers folder, in checkpoints/NAME/",
        ),
    ] = "comfy",
    models: Annotated[
        Path | None,
        typer.Option(
            "--models",
            help=f"The models folder to fill [default: the first of ${MODELS_ENV}, else models/ in the data dir, "
            "which the commands read when given no --models]",
        ),
    ] = None,
    list_: Annotated[bool, typer.Option("--list", help="Show the models that can be pulled, and stop")] = False,
) -> None:
    """Download official Z-Image weights from the Hugging Face hub into the models folder the server reads.

    Files already complete are not downloaded again; HF_ENDPOINT and HF_TOKEN are honoured."""
    if list_:
        _print_catalogue()
        return
    if not names:
        raise typer.BadParameter(
            f"name a model to pull: {', '.join(CATALOGUE)} (--list describes them)", param_hint="NAME"
        )
    unknown = [name for name in names if name not in CATALOGUE]
    if unknown:
        raise typer.BadParameter(f"unknown model {unknown[0]!r}; known: {', '.join(CATALOGUE)}", param_hint="NAME")
    if layout not in LAYOUTS:
        raise typer.BadParameter(f"{layout!r} is not one of {', '.join(LAYOUTS)}", param_hint="--layout")
    folder = models or _pull_destination()
    if folder.exists() and not folder.is_dir():
        raise typer.BadParameter(f"{folder} is not a folder", param_hint="--models")
    from zimage_serve.pull import pull as fetch

    for name in dict.fromkeys(names):
        entry = CATALOGUE[name]
        console.print(f"{entry.title}: {name}, {layout} layout → {folder}", highlight=False)
        outcome = fetch(entry, layout, folder, console, console_err)
        console.print(
            f"{name}: complete ({len(outcome.downloaded)} downloaded, {len(outcome.present)} already there)",
            highlight=False,
        )
    if folder not in _read_by_default():
        console.print(f"the commands read it when given --models {folder}", highlight=False)


@app.command("catalogue")
def catalogue() -> None:
    """The models `zimage models pull` can download: what each holds, and about how large it is."""
    _print_catalogue()


def _print_catalogue() -> None:
    rows = [
        (entry.name, entry.title, entry.about, " / ".join(_approx(entry, layout) for layout in _layouts(entry)))
        for entry in CATALOGUE.values()
    ]
    if not console.is_terminal:
        for row in rows:
            typer.echo("\t".join(row))
        return
    table = Table("name", "model", "contents", "size (about)")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _layouts(entry: Entry) -> tuple[str, ...]:
    return tuple(layout for layout in LAYOUTS if layout in entry.layouts)


def _approx(entry: Entry, layout: str) -> str:
    size = filesize.decimal(approx_size(entry, layout))
    return f"{size} {layout}" if len(entry.layouts) > 1 else f"{size} (either layout)"


def _read_by_default() -> list[Path]:
    """The folders the commands read when given no --models: $ZIMAGE_MODELS's, else the default one."""
    return [Path(p) for p in os.environ.get(MODELS_ENV, "").split(os.pathsep) if p] or [default_models_dir()]


def _pull_destination() -> Path:
    return _read_by_default()[0]
