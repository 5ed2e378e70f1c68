"""`zimage templates`: list, show and add versioned templates in the data folder."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from zimage_serve.cli.common import console, console_err
from zimage_serve.settings import DATA_DIR_ENV, default_data_dir

if TYPE_CHECKING:
    from zimage_serve.templates import TemplateLibrary

app = typer.Typer(help="Templates: a workflow plus named parameters, versioned.", no_args_is_help=True)

DataDirOption = Annotated[Path | None, typer.Option(help=f"The server's data folder [env {DATA_DIR_ENV}]")]


def library(data_dir: Path | None) -> TemplateLibrary:
    from zimage_serve.templates import TemplateLibrary

    return TemplateLibrary((data_dir or default_data_dir()) / "templates")


def _wide() -> Console:
    # Piped output keeps every column whole, whatever the terminal's width would have been.
    return console if console.is_terminal else Console(width=200, soft_wrap=True)


@app.command("list")
def list_templates(data_dir: DataDirOption = None) -> None:
    """Every template: its latest version, the versions kept, and its parameters."""
    table = Table("name", "version", "versions", "source", "parameters")
    for entry in library(data_dir).catalogue():
        table.add_row(
            entry["name"],
            str(entry["version"]),
            str(len(entry["versions"])),
            "built in" if entry["builtin"] else "data",
            ", ".join(entry["parameters"]),
        )
    _wide().print(table)


@app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="The template's name")],
    version: Annotated[int | None, typer.Option(help="A version (default: the latest)", min=1)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole template document")] = False,
    data_dir: DataDirOption = None,
) -> None:
    """A template's parameters: type, default, range and the node inputs each one sets."""
    from zimage_serve.templates import TemplateError

    try:
        template = library(data_dir).get(name, version)
    except TemplateError as exc:
        raise typer.BadParameter(str(exc), param_hint="NAME") from exc
    if as_json:
        typer.echo(json.dumps(template.to_json(), ensure_ascii=False, indent=1))
        return
    made = time.strftime("%Y-%m-%d %H:%M", time.localtime(template.created)) if template.created else "built in"
    console.print(f"{template.name} v{template.version} ({made}): {template.title}", highlight=False)
    if template.description:
        console.print(template.description, highlight=False)
    table = Table("parameter", "type", "default", "allowed", "sets", "meaning")
    for parameter in template.parameters.values():
        table.add_row(
            parameter.name,
            parameter.type,
            _shown(parameter.default),
            _allowed(parameter),
            ", ".join(map(str, parameter.targets)),
            parameter.description,
        )
    _wide().print(table)


@app.command("add")
def add(
    file: Annotated[Path, typer.Argument(help="A template document, or a workflow in API or UI format")],
    name: Annotated[str, typer.Option(help="The template's name (adding to a name makes its next version)")],
    title: Annotated[str | None, typer.Option(help="A one-line title")] = None,
    description: Annotated[str | None, typer.Option(help="What it makes")] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Add a template, or a new version of one; a plain workflow gets the usual parameters."""
    from zimage_serve.templates import TemplateError
    from zimage_serve.templates.source import template_from

    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise typer.BadParameter("file not found", param_hint="FILE") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise typer.BadParameter(f"not JSON ({exc})", param_hint="FILE") from None
    try:
        template = template_from(data, name, to_api=_to_api, title=title, description=description)
        added = library(data_dir).add(template)
    except TemplateError as exc:
        hint = "--name" if str(exc).startswith("name:") else "FILE"
        raise typer.BadParameter(str(exc).removeprefix("name: "), param_hint=hint) from exc
    made = added.template
    unknown = sorted({node["class_type"] for node in made.workflow.values()} - set(_nodes()))
    if unknown:
        console_err.print(f"[yellow]note:[/] no node {', '.join(unknown)} here; a server without them refuses it")
    if added.created:
        console_err.print(f"added {made.name} v{made.version} ({', '.join(made.parameters)})", highlight=False)
    else:
        console_err.print(f"{made.name} v{made.version} already has this content; nothing added", highlight=False)
    typer.echo(f"{made.name} v{made.version}")


def _nodes() -> dict[str, Any]:
    from zimage_serve.workflow.nodes import NODES

    return dict(NODES)


def _to_api(data: Any) -> dict[str, Any]:
    from zimage_serve.workflow.ui_format import to_api

    return to_api(data, _nodes())


def _shown(value: Any) -> str:
    if value is None:
        return "-"
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _allowed(parameter: Any) -> str:
    if parameter.choices:
        return ", ".join(parameter.choices)
    if parameter.minimum is not None or parameter.maximum is not None:
        low = "" if parameter.minimum is None else _shown(parameter.minimum)
        high = "" if parameter.maximum is None else _shown(parameter.maximum)
        return f"{low}–{high}"
    if parameter.bypass is not None:
        return "unset: node bypassed"
    return "non-empty" if not parameter.allow_empty else ""
