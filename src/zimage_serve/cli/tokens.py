"""`zimage tokens`: make, list and revoke API tokens (the running server sees changes within a second)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from zimage_serve.cli.common import console, console_err
from zimage_serve.settings import DATA_DIR_ENV, default_data_dir

if TYPE_CHECKING:
    from zimage_serve.security.tokens import TokenStore

app = typer.Typer(help="API tokens: create, list, revoke.", no_args_is_help=True)

DataDirOption = Annotated[Path | None, typer.Option(help=f"The server's data folder [env {DATA_DIR_ENV}]")]


def _store(data_dir: Path | None) -> TokenStore:
    from zimage_serve.security.tokens import TokenStore

    return TokenStore((data_dir or default_data_dir()) / "auth.sqlite3")


@app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="The user's name (letters, digits, '_', '.', '-')")],
    role: Annotated[str, typer.Option(help="user or admin")] = "user",
    rpm: Annotated[int | None, typer.Option(help="State-changing requests a minute", min=1)] = None,
    images_per_day: Annotated[
        int | None, typer.Option(help="Images a day (UTC; every image a sampler makes counts)", min=1)
    ] = None,
    max_queued: Annotated[int | None, typer.Option(help="Jobs waiting or running at once", min=1)] = None,
    max_pixels: Annotated[int | None, typer.Option(help="Pixels per image", min=1)] = None,
    max_steps: Annotated[int | None, typer.Option(help="Sampler steps", min=1)] = None,
    max_storage: Annotated[
        str | None,
        typer.Option(help="What the user may store (uploads, saved workflows, templates), as 500MB or 2GiB"),
    ] = None,
    max_files: Annotated[
        int | None, typer.Option(help="Files the user may store (uploads, saved workflows, templates)", min=1)
    ] = None,
    inherit: Annotated[
        bool,
        typer.Option(
            "--inherit",
            help="Continue the user of NAME's revoked token: its jobs, history, files and templates. Without "
            "it, a token under a used name is a new user who sees none of them",
        ),
    ] = False,
    data_dir: DataDirOption = None,
) -> None:
    """Make a token and print it once, as the last line (it is stored only as a hash)."""
    from zimage_serve.security.tokens import TokenError

    storage = _bytes(max_storage)
    store = _store(data_dir)
    try:
        token, record = store.create(
            name,
            role,
            inherit,
            rpm=rpm,
            images_per_day=images_per_day,
            max_queued=max_queued,
            max_pixels=max_pixels,
            max_steps=max_steps,
            max_storage=storage,
            max_files=max_files,
        )
    except TokenError as exc:
        hint, _, reason = str(exc).partition(": ")
        raise typer.BadParameter(reason, param_hint=hint) from exc
    finally:
        store.close()
    user = "" if record.owner == record.name else f", user {record.owner}"
    console_err.print(f"token for {record.name} ({record.role}{user}); it is shown only now:", highlight=False)
    typer.echo(token)


@app.command("list")
def list_tokens(data_dir: DataDirOption = None) -> None:
    """Names, roles, limits, usage today, created and last used (never a token)."""
    from zimage_serve.queue.sqlite_queue import SQLiteQueue
    from zimage_serve.security.tokens import LIMITS

    folder = data_dir or default_data_dir()
    store = _store(folder)
    try:
        tokens = store.tokens()
    finally:
        store.close()
    usage: dict[str, dict[str, int]] = {}
    queue_file = folder / "queue.sqlite3"
    if queue_file.exists():
        jobs = SQLiteQueue(queue_file)
        try:
            usage = {row["user"]: row for row in jobs.usage()}
        finally:
            jobs.close()
    table = Table("name", "user", "role", *LIMITS, "images today", "queued", "created", "last used", "state")
    for token in tokens:
        used = usage.get(token.owner, {})
        table.add_row(
            token.name,
            token.owner,
            token.role,
            *(str(getattr(token, k)) if getattr(token, k) is not None else "-" for k in LIMITS),
            str(used.get("images_today", 0)),
            str(used.get("queued", 0)),
            _when(token.created),
            _when(token.last_used),
            "revoked " + _when(token.revoked) if token.revoked else "active",
        )
    # Piped output keeps every column whole, whatever the terminal's width would have been.
    (console if console.is_terminal else Console(width=200, soft_wrap=True)).print(table)


@app.command("revoke")
def revoke(name: Annotated[str, typer.Argument(help="The token's name")], data_dir: DataDirOption = None) -> None:
    """Revoke a token; a running server refuses it within a second and closes its connections."""
    from zimage_serve.security.tokens import TokenError

    store = _store(data_dir)
    try:
        store.revoke(name)
    except TokenError as exc:
        raise typer.BadParameter(str(exc).removeprefix("NAME: "), param_hint="NAME") from exc
    finally:
        store.close()
    console_err.print(f"revoked {name}", highlight=False)


def _bytes(size: str | None) -> int | None:
    from pydantic import ByteSize, TypeAdapter, ValidationError

    if size is None:
        return None
    try:
        return int(TypeAdapter(ByteSize).validate_python(size))
    except ValidationError as exc:
        raise typer.BadParameter(f"{size!r} is not a size such as 500MB or 2GiB", param_hint="--max-storage") from exc


def _when(value: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value)) if value else "-"
