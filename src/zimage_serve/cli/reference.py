"""The `zimage` command as a click command, for the documentation's command reference.

docs/reference/commands.md renders every command and option from it with the mkdocs-click extension
(`:module: zimage_serve.cli.reference`, `:command: command`), so the reference is the CLI's own --help.
Importing this module builds the Typer app's click command; it loads no more than `zimage --help` does.
"""

from __future__ import annotations

import typer

from zimage_serve.cli import app

command = typer.main.get_command(app)
"""The `zimage` command group with all its subcommands, as click sees it (Typer's own copy of click)."""
