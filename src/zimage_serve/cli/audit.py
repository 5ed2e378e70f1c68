"""`zimage audit`: check the audit log's chain, and write its records out."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path
from typing import Annotated

import typer

from zimage_serve.cli.common import console_err
from zimage_serve.settings import DATA_DIR_ENV, default_data_dir

app = typer.Typer(help="The audit log: verify, export.", no_args_is_help=True)
DataDirOption = Annotated[Path | None, typer.Option(help=f"The server's data folder [env {DATA_DIR_ENV}]")]
NodeOption = Annotated[
    str | None, typer.Option(help="A cluster's API node (its --node-name, default HOST-PORT): that node's log")
]


@app.command("verify")
def verify(data_dir: DataDirOption = None, node: NodeOption = None) -> None:
    """Check every record's hash chain against the head kept in the queue database; exits 1 naming the
    first bad record."""
    from zimage_serve.security.audit import log_place
    from zimage_serve.security.audit_verify import verify as verify_log

    checked, problem = verify_log(*log_place(data_dir or default_data_dir(), node))
    if problem is not None:
        console_err.print(f"[bold red]audit log damaged:[/] {problem}", highlight=False)
        raise typer.Exit(1)
    console_err.print(f"audit log intact: {checked} records", highlight=False)


@app.command("export")
def export(
    format: Annotated[str, typer.Option("--format", help="jsonl or csv")] = "jsonl",
    user: Annotated[str | None, typer.Option(help="Only this user's records")] = None,
    since: Annotated[str | None, typer.Option(help="Only records from this date or time on (ISO 8601, UTC)")] = None,
    data_dir: DataDirOption = None,
    node: NodeOption = None,
) -> None:
    """Write the records to standard output."""
    from zimage_serve.security.audit import log_place
    from zimage_serve.security.audit_verify import export as export_records
    from zimage_serve.security.audit_verify import records

    if format not in ("jsonl", "csv"):
        raise typer.BadParameter(f"{format!r} is not jsonl or csv", param_hint="--format")
    start = None
    if since is not None:
        try:
            moment = datetime.datetime.fromisoformat(since)
        except ValueError as exc:
            raise typer.BadParameter(f"{since!r} is not an ISO 8601 date or time", param_hint="--since") from exc
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
        start = moment.timestamp()
    folder, _ = log_place(data_dir or default_data_dir(), node)
    export_records(sys.stdout, records(folder, user=user, since=start), format)
