"""`zimage webhooks`: register the endpoints job events are sent to, see what could not be delivered, replay it.

Endpoints live with the queue: the data folder's queue file, or a cluster's Redis (`--queue`); a running
server sends to a new one from its next event.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from zimage_serve.cli.common import console, console_err
from zimage_serve.cli.queue_side import DataDirOption, QueueOption, queue_side
from zimage_serve.settings import default_data_dir

if TYPE_CHECKING:
    from zimage_serve.webhooks.store import Webhooks

app = typer.Typer(help="Webhooks: endpoints that receive signed job events.", no_args_is_help=True)


def _store(data_dir: Path | None, queue: str | None) -> Webhooks:
    side = queue_side(data_dir, queue)
    if side.cluster is not None:
        from zimage_serve.webhooks.redis_store import RedisWebhookStore

        cluster = side.cluster
        return RedisWebhookStore(cluster.redis, cluster.prefix, cluster.call, on_close=cluster.close)
    from zimage_serve.webhooks.store import WebhookStore

    return WebhookStore(side.path)


def _user_id(name: str, data_dir: Path | None) -> str:
    """The user a token name stands for, as jobs are owned."""
    from zimage_serve.security.tokens import TokenStore

    store = TokenStore((data_dir or default_data_dir()) / "auth.sqlite3")
    try:
        user = store.user_named(name)
    finally:
        store.close()
    if user is None:
        raise typer.BadParameter(f"no token is named {name!r} (`zimage tokens list`)", param_hint="--user")
    return user


@app.command("add")
def add(
    url: Annotated[str, typer.Argument(help="Where the events are POSTed (http or https)")],
    name: Annotated[str | None, typer.Option(help="What jobs call it (extra_data.webhook) [default: the host]")] = None,
    events: Annotated[
        str, typer.Option(help="Comma-separated: queued, started, succeeded, failed, canceled, or all")
    ] = "all",
    user: Annotated[
        str | None, typer.Option(help="Only this user's jobs may name it (a token's name) [default: anyone's]")
    ] = None,
    subscribe: Annotated[
        bool,
        typer.Option(
            "--subscribe", help="Send every job's events (the --user's, or everyone's), not only jobs that name it"
        ),
    ] = False,
    data_dir: DataDirOption = None,
    queue: QueueOption = None,
) -> None:
    """Register an endpoint and print its signing secret once, as the last line."""
    from urllib.parse import urlsplit

    from zimage_serve.webhooks.store import WebhookError

    owner = _user_id(user, data_dir) if user else ""
    store = _store(data_dir, queue)
    try:
        chosen = [event.strip() for event in events.split(",")]
        endpoint, secret = store.add(name or (urlsplit(url).hostname or "endpoint"), url, chosen, owner, subscribe)
    except WebhookError as exc:
        field, _, why = str(exc).partition(": ")
        raise typer.BadParameter(why, param_hint=f"--{field}" if field != "url" else "URL") from exc
    finally:
        store.close()
    console_err.print(
        f"endpoint {endpoint.name!r} ({', '.join(endpoint.events)}): verify deliveries with this secret, "
        "shown only now:"
    )
    console.print(secret, highlight=False)


@app.command("list")
def list_endpoints(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per endpoint")] = False,
    data_dir: DataDirOption = None,
    queue: QueueOption = None,
) -> None:
    """The endpoints, without their secrets."""
    store = _store(data_dir, queue)
    try:
        endpoints = store.endpoints()
    finally:
        store.close()
    if as_json:
        for endpoint in endpoints:
            console.print(json.dumps(endpoint.public()), highlight=False)
        return
    table = Table("name", "url", "events", "user", "subscribed")
    for endpoint in endpoints:
        table.add_row(endpoint.name, endpoint.url, ",".join(endpoint.events), endpoint.owner or "anyone",
                      "yes" if endpoint.subscribe else "named jobs")  # fmt: skip
    console.print(table)


@app.command("remove")
def remove(name: Annotated[str, typer.Argument()], data_dir: DataDirOption = None, queue: QueueOption = None) -> None:
    """Remove an endpoint; deliveries still waiting for it are dropped."""
    store = _store(data_dir, queue)
    try:
        if not store.remove(name):
            raise typer.BadParameter(f"no endpoint is named {name!r}", param_hint="NAME")
    finally:
        store.close()
    console_err.print(f"removed {name!r}")


@app.command("dead")
def dead(data_dir: DataDirOption = None, queue: QueueOption = None) -> None:
    """Deliveries given up on (their endpoint never answered 2xx in time), one JSON object a line."""
    store = _store(data_dir, queue)
    try:
        for letter in store.dead_letters():
            console.print(json.dumps(letter), highlight=False)
    finally:
        store.close()


@app.command("replay")
def replay(
    ids: Annotated[list[str] | None, typer.Argument(help="webhook-ids to send again [default: every dead one]")] = None,
    data_dir: DataDirOption = None,
    queue: QueueOption = None,
) -> None:
    """Send dead deliveries again, with fresh attempts (a running server picks them up at once)."""
    store = _store(data_dir, queue)
    try:
        count = store.replay(ids or None)
    finally:
        store.close()
    console_err.print(f"{count} deliveries back in the outbox")
