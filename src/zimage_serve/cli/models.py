"""`zimage models`: what model files are where, and why any of them cannot be used."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich import filesize
from rich.table import Table

from zimage_serve.cli.common import TokenizerOption, console
from zimage_serve.engine.names import ROOT_FOLDERS
from zimage_serve.errors import ZImageError
from zimage_serve.settings import MODEL_ENV, MODELS_ENV


@dataclass(frozen=True)
class Finding:
    path: Path
    kind: str
    size: int
    status: str  # "usable" or the reason it is not


def models(
    paths: Annotated[list[Path] | None, typer.Argument(help="Folders or files to inspect")] = None,
    tokenizer: TokenizerOption = None,
) -> None:
    """List the models found (the built-in one, $ZIMAGE_MODEL, $ZIMAGE_MODELS and PATHS) and check each."""
    from zimage_serve.nano.default import SHIPPED

    targets = list(paths or [])
    if not targets:
        targets.append(SHIPPED)
        if os.environ.get(MODEL_ENV):
            targets.append(Path(os.environ[MODEL_ENV]))
        targets += [Path(p) for p in os.environ.get(MODELS_ENV, "").split(os.pathsep) if p]
    findings = [f for target in targets for f in inspect(target, tokenizer)]
    if not console.is_terminal:  # piped: one tab-separated line per finding, nothing wrapped
        for f in findings:
            console.out("\t".join((str(f.path), f.kind, _size(f.size), f.status)), highlight=False)
        return
    table = Table("path", "kind", "size", "status", show_lines=False)
    for f in findings:
        style = "green" if f.status == "usable" else "red"
        table.add_row(str(f.path), f.kind, _size(f.size), f"[{style}]{f.status}[/]")
    console.print(table)


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
