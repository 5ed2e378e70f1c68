"""Downloading a catalogue model into a models folder, through huggingface_hub.

huggingface_hub does the transfers, so HF_ENDPOINT, HF_TOKEN, Xet storage and its retries (an interrupted
transfer is picked up with a Range request) work as they do everywhere else. Files are fetched into a staging
folder inside the models folder (`local_dir=`, not the shared cache, so nothing is kept twice) and moved into
place once whole: a file at its destination is always complete, on the same disk, in one copy. A destination
that already holds a file of the size the hub lists is not fetched again. One listing per repository pins its
commit, so every file of a pull comes from one revision even if the repository changes meanwhile.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich import filesize
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from zimage_serve.catalogue import Entry
from zimage_serve.errors import ZImageError

STAGING = ".zimage-pull"  # inside the models folder: same disk, so moving a finished file costs nothing
LISTING_TIMEOUT_S = 20.0


class PullError(ZImageError):
    """A pull that cannot go on; the message names the repository, the file or the setting at fault."""


@dataclass(frozen=True)
class Planned:
    repo: str
    commit: str
    path: str  # in the repository
    size: int | None  # as the hub lists it
    destination: Path

    @property
    def complete(self) -> bool:
        try:
            found = self.destination.stat()
        except OSError:
            return False
        return stat.S_ISREG(found.st_mode) and (self.size is None or found.st_size == self.size)


@dataclass
class Outcome:
    downloaded: list[Planned] = field(default_factory=list)
    present: list[Planned] = field(default_factory=list)


def endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def plan(entry: Entry, layout: str, models: Path) -> list[Planned]:
    """Every file the entry needs in this layout, with its size and commit; one hub listing per repository."""
    listings: dict[tuple[str, str], tuple[str, dict[str, int | None]]] = {}
    planned: dict[Path, Planned] = {}
    for source in entry.sources(layout):
        key = (source.repo, source.revision)
        if key not in listings:
            listings[key] = _listing(source.repo, source.revision)
        commit, files = listings[key]
        matched = sorted(path for path in files if source.wants(path))
        if not matched:
            raise PullError(
                f"{source.repo} (revision {source.revision}) holds no {' or '.join(source.patterns)}: "
                "the repository changed; a newer zimage-serve may know where the files went"
            )
        for path in matched:
            destination = models / source.destination(path)
            planned.setdefault(destination, Planned(source.repo, commit, path, files[path], destination))
    return list(planned.values())


def pull(entry: Entry, layout: str, models: Path, out: Console, err: Console) -> Outcome:
    """Fetch what is missing, report each file on `out` and draw progress on `err`."""
    planned = plan(entry, layout, models)
    outcome = Outcome()
    missing: list[Planned] = []
    for item in planned:
        (outcome.present if item.complete else missing).append(item)
    for item in outcome.present:
        out.print(f"  [green]✓[/] {_shown(item, models)}  already complete", highlight=False)
    if not missing:
        return outcome
    _check_space(models, missing)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=True) as progress:
        for item in missing:
            _download(item, models, progress)
            outcome.downloaded.append(item)
            out.print(f"  [green]↓[/] {_shown(item, models)}  downloaded", highlight=False)  # above the bars
    _clear_staging(models, {item.repo for item in missing})
    return outcome


def _listing(repo: str, revision: str) -> tuple[str, dict[str, int | None]]:
    from huggingface_hub import HfApi

    with _explained(repo, revision=revision):
        info = HfApi().model_info(repo, revision=revision, files_metadata=True, timeout=LISTING_TIMEOUT_S)
    if not info.sha:
        raise PullError(f"{endpoint()} (HF_ENDPOINT) named no commit for {repo}: is it a Hugging Face hub?")
    return info.sha, {sibling.rfilename: sibling.size for sibling in info.siblings or []}


def _download(item: Planned, models: Path, progress: Progress) -> None:
    from huggingface_hub import hf_hub_download

    staging = models / STAGING / item.repo.replace("/", "--")
    with _explained(item.repo, path=item.path, destination=item.destination):
        fetched = hf_hub_download(
            item.repo,
            item.path,
            revision=item.commit,
            local_dir=staging,
            tqdm_class=_bar_class(progress, item.destination.name),
        )
        item.destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(fetched, item.destination)
    if not item.complete:  # the server sent another size than its listing says: a mirror out of step, say
        raise PullError(f"{item.destination}: {item.destination.stat().st_size} bytes came, the hub lists {item.size}")


def _check_space(models: Path, missing: list[Planned]) -> None:
    """Refuse at once rather than after hours: the disk must hold what is left to fetch."""
    needed = sum(item.size or 0 for item in missing)
    try:
        models.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(models).free
    except OSError as exc:
        raise PullError(f"{models}: {exc.strerror or exc}") from exc
    if needed > free:
        raise PullError(
            f"{models}: not enough free space ({filesize.decimal(free)} free, {filesize.decimal(needed)} to download)"
        )


def _clear_staging(models: Path, repos: set[str]) -> None:
    """What a finished pull leaves in the staging folder is bookkeeping only (locks, metadata)."""
    for repo in repos:
        shutil.rmtree(models / STAGING / repo.replace("/", "--"), ignore_errors=True)
    with contextlib.suppress(OSError):
        (models / STAGING).rmdir()  # only if no other pull is using it


def _shown(item: Planned, models: Path) -> str:
    size = f" ({filesize.decimal(item.size)})" if item.size else ""
    return f"{item.destination.relative_to(models).as_posix()}{size}"


def _bar_class(progress: Progress, label: str) -> Any:
    """A tqdm class for huggingface_hub's `tqdm_class=` that draws in our rich Progress instead of printing.

    A tqdm subclass (not a look-alike), so whatever tqdm API a huggingface_hub version uses keeps working;
    and not huggingface_hub's own tqdm, so its progress bars stay visible here even where the CLI turned them
    off for the libraries (HF_HUB_DISABLE_PROGRESS_BARS)."""
    from tqdm import tqdm

    class Bar(tqdm):  # type: ignore[misc]
        monitor_interval = 0  # no tqdm monitor thread: rich refreshes the display

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            kwargs.update(file=io.StringIO(), disable=False, mininterval=float("inf"))
            self._task: Any = None
            super().__init__(*args, **kwargs)
            desc = str(kwargs.get("desc") or "")
            detail = desc.rpartition(": ")[2] if ": " in desc else ""  # Xet's two bars: "reconstructing", ...
            self._task = progress.add_task(f"{label} ({detail})" if detail else label, total=self.total)
            self._show()

        def update(self, n: float | None = 1) -> bool | None:
            shown: bool | None = super().update(n)
            self._show()
            return shown

        def refresh(self, *args: Any, **kwargs: Any) -> None:
            super().refresh(*args, **kwargs)
            self._show()

        def close(self) -> None:
            if self._task is not None:  # a finished file's bar goes; the caller prints a line for it
                progress.remove_task(self._task)
                self._task = None
            super().close()

        def _show(self) -> None:
            if self._task is not None:
                progress.update(self._task, total=self.total, completed=self.n)

    return Bar


def _network_errors() -> tuple[type[BaseException], ...]:
    """The transport errors of whichever HTTP library this huggingface_hub uses (requests, httpx, httpx2)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (
        ("httpx", ("TransportError",)),
        ("httpx2", ("TransportError",)),
        ("requests", ("RequestException",)),
    ):
        loaded = sys.modules.get(module)
        for name in names:
            kind = getattr(loaded, name, None)
            if isinstance(kind, type) and issubclass(kind, BaseException):
                found.append(kind)
    return tuple(found)


@contextlib.contextmanager
def _explained(
    repo: str, *, revision: str | None = None, path: str | None = None, destination: Path | None = None
) -> Iterator[None]:
    """huggingface_hub's, the network's and the disk's errors, as one line saying what to do."""
    try:
        yield
    except PullError:
        raise
    except Exception as exc:
        message = _message(exc, repo, revision, path, destination)
        if message is None:
            raise
        raise PullError(message) from exc


def _message(exc: Exception, repo: str, revision: str | None, path: str | None, destination: Path | None) -> str | None:
    from huggingface_hub import errors

    hub = endpoint()
    where = f"{repo}/{path}" if path else repo
    if isinstance(exc, errors.OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set, so the hub is not asked; unset it to pull models"
    if isinstance(exc, errors.GatedRepoError):
        return f"{repo} is gated: accept its terms at {hub}/{repo} and set HF_TOKEN to a token of that account"
    if isinstance(exc, errors.RepositoryNotFoundError):
        return f"{repo} not found at {hub} (HF_ENDPOINT); a private repository needs HF_TOKEN"
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"{repo} has no revision {revision or '(the one listed)'} at {hub}"
    if isinstance(exc, errors.EntryNotFoundError):
        return f"{where} not found at {hub}: the repository changed"
    if isinstance(exc, errors.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            return f"{hub} refused {where} (HTTP {status}): set HF_TOKEN to a token that may read it"
        if status == 404:
            return f"{hub} has no {where} (HTTP 404): is HF_ENDPOINT a Hugging Face hub or a mirror of it?"
        later = "; try again later" if isinstance(status, int) and status >= 500 else ""
        return f"{hub} answered HTTP {status} for {where}{later}"
    if isinstance(exc, (errors.LocalEntryNotFoundError, *_network_errors())):
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"cannot reach the Hugging Face hub at {hub} (HF_ENDPOINT): {reason}"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{destination or exc.filename or where}: {exc.strerror}"
    if isinstance(exc, OSError):  # huggingface_hub's own, e.g. "Consistency check failed" on a short transfer
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"{where}: the download failed ({reason}); run the same command again"
    return None
