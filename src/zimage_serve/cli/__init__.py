"""The `zimage` command."""

from __future__ import annotations

import os
import sys

import typer

from zimage_serve import __version__
from zimage_serve.cli import (
    audit,
    batch,
    generate,
    info,
    models,
    nano,
    outputs,
    run,
    serve,
    templates,
    tokens,
    webhooks,
    worker,
)
from zimage_serve.cli.common import console_err, quiet_libraries
from zimage_serve.errors import ZImageError

app = typer.Typer(
    name="zimage",
    help="Generate images with Z-Image models; serve them over ComfyUI's API.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # help texts say "[default: ...]" and "[env ...]" literally
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"zimage-serve {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version"),
) -> None:
    """Generate images with Z-Image models; serve them over ComfyUI's API."""


app.command("generate")(generate.generate)
app.command("info")(info.info)
app.command("run")(run.run)
app.command("serve")(serve.serve)
app.command("worker")(worker.worker)
app.command("batch")(batch.batch)
app.add_typer(models.app, name="models")
app.add_typer(nano.app, name="nano")
app.add_typer(tokens.app, name="tokens")
app.add_typer(audit.app, name="audit")
app.add_typer(templates.app, name="templates")
app.add_typer(webhooks.app, name="webhooks")
app.add_typer(outputs.app, name="outputs")


def main(args: list[str] | None = None) -> None:
    """Entry point; exits with 1 for a user error (message, no traceback), 2 for bad usage."""
    quiet_libraries()
    try:
        app(args=args)
    except ZImageError as exc:
        console_err.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        console_err.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # a bug: say so plainly, keep the traceback for those who ask
        if os.environ.get("ZIMAGE_DEBUG"):
            raise
        console_err.print(
            f"[bold red]internal error:[/] {type(exc).__name__}: {exc}\n"
            "This is a bug in zimage-serve; run again with ZIMAGE_DEBUG=1 for the traceback.",
            highlight=False,
        )
        sys.exit(70)
