"""Output file names as ComfyUI's SaveImage makes them, without collisions between concurrent runs.

`prefix` may hold a subfolder (`portraits/zimage`) and date tokens (`%date:yyyy-MM-dd%`, `%year%` ...).
Files are `<prefix>_<counter:05>_.png`, the counter one past the highest already there (each folder is
listed once, then counted in memory); the name is claimed by creating the file exclusively, so two
runs saving at once never get the same one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import itertools
import os
import re
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from zimage_serve.errors import InvalidParameterError, ZImageError
from zimage_serve.workflow.folders import UnknownFileError, check_relative
from zimage_serve.workflow.output_journal import NO_LINK, OutputJournal

_DATE_TOKEN = re.compile(r"%date:([^%]+)%")
_DATE_PARTS = (("yyyy", "%Y"), ("yy", "%y"), ("MM", "%m"), ("dd", "%d"), ("hh", "%H"), ("mm", "%M"), ("ss", "%S"))
_SIMPLE = {"%year%": "%Y", "%month%": "%m", "%day%": "%d", "%hour%": "%H", "%minute%": "%M", "%second%": "%S"}


# Per (folder, extension): the highest counter seen or handed out for each prefix in this process.
_counters: dict[tuple[str, str], dict[str, int]] = {}
# Exclusive creation, in binary mode on Windows; Python makes the descriptor non-inheritable itself.
_CREATE_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
_lock = threading.Lock()
T = TypeVar("T")


def _folder_counters(folder: str, extension: str) -> dict[str, int]:
    """Read a (resolved) folder's existing `<stem>_NNNNN_.<ext>` names once, making the folder if it is
    new; later claims update the table."""
    key = (folder, extension)
    if key not in _counters:
        os.makedirs(folder, exist_ok=True)
        pattern = re.compile(r"^(.*)_(\d+)_?\." + re.escape(extension) + "$")
        table: dict[str, int] = {}
        for name in os.listdir(folder):
            match = pattern.match(name)
            if match:
                table[match.group(1)] = max(table.get(match.group(1), 0), int(match.group(2)))
        _counters[key] = table
    return _counters[key]


def _through_symlink(root: str, parts: list[str]) -> bool:
    """Whether a path below the (resolved) root passes through a symbolic link: one lstat per part below
    the root, where resolving the whole path would look at every part from the filesystem's root."""
    current = root
    for part in parts:
        current = os.path.join(current, part)
        try:
            if stat.S_ISLNK(os.lstat(current).st_mode):
                return True
        except FileNotFoundError:
            return False  # not made yet: it will be a plain folder, made by us
    return False


@functools.lru_cache(maxsize=64)
def _resolved(folder: Path) -> str:
    """The output folder's real path (it is the server's own; looked up once, not per image)."""
    return str(folder.resolve())


@dataclass(frozen=True)
class ClaimedName:
    """A reserved name and the empty file created for it, open for writing; use it in a `with` block."""

    path: str
    filename: str
    subfolder: str
    fd: int

    def write(self, data: bytes | memoryview) -> None:
        write_all(self.fd, data)

    def __enter__(self) -> ClaimedName:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def expand_prefix(prefix: str, now: dt.datetime | None = None) -> str:
    if "%" not in prefix:
        return prefix
    now = now or dt.datetime.now()

    def date(match: re.Match[str]) -> str:
        pattern = match.group(1)
        for token, code in _DATE_PARTS:
            pattern = pattern.replace(token, code)
        return now.strftime(pattern)

    expanded = _DATE_TOKEN.sub(date, prefix)
    for token, code in _SIMPLE.items():
        expanded = expanded.replace(token, now.strftime(code))
    return expanded


def _parts(prefix: str, field: str) -> list[str]:
    """The prefix's path parts, dates expanded; refused when it would leave the output folder or holds a
    character no file name (or the header a file is served with) may hold."""
    expanded = expand_prefix(prefix).replace("\\", "/")
    parts = [p for p in expanded.split("/") if p not in ("", ".")]
    if not parts or ".." in parts or expanded.startswith("/"):
        raise InvalidParameterError(field, f"{prefix!r} must name a file inside the output folder")
    try:
        check_relative(field, "/".join(parts))
    except UnknownFileError as exc:
        raise InvalidParameterError(field, f"{prefix[:60]!r} {exc.why}") from exc
    return parts


def check_prefix(prefix: str, field: str = "filename_prefix") -> None:
    """Raise InvalidParameterError if `prefix` cannot name an output file (validation, before a run)."""
    _parts(prefix, field)


def _target(folder: Path, prefix: str, field: str) -> tuple[str, str, str]:
    """(the folder to write in, the subfolder as shown, the file stem) for a prefix."""
    parts = _parts(prefix, field)
    subfolder, stem = "/".join(parts[:-1]), parts[-1]
    # Plain strings from here: pathlib's joins and conversions cost more than the file creation's
    # system call on this path, which runs once per saved image.
    root = _resolved(folder)
    target = os.path.join(root, *parts[:-1])
    if subfolder and _through_symlink(root, parts[:-1]):
        target = os.path.realpath(target)
        if os.path.commonpath((root, target)) != root:  # a symlink inside the output folder pointing out of it
            raise InvalidParameterError(field, f"{prefix!r} leads outside the output folder")
    return target, subfolder, stem


def _next_free(
    target: str, stem: str, extension: str, make: Callable[[str], T], trailing: bool = True
) -> tuple[str, T]:
    """The next free `<stem>_NNNNN_.<ext>` in `target` (`<stem>_NNNNN.<ext>` without `trailing`, as V3
    nodes name theirs), one past the highest counter seen in either form, taken by `make(path)`, which must
    fail with FileExistsError when the name is taken (then the next is tried)."""
    with _lock:
        counters = _folder_counters(target, extension)
        counter = counters.get(stem, 0) + 1
        while True:
            filename = f"{stem}_{counter:05}{'_' if trailing else ''}.{extension}"
            try:
                made = make(os.path.join(target, filename))
            except FileExistsError:  # written by someone else meanwhile: the exclusive create is the guard
                counter += 1
                continue
            except FileNotFoundError:  # the folder was removed since it was first used
                os.makedirs(target, exist_ok=True)
                continue
            counters[stem] = counter
            return filename, made


def _create_new(path: str) -> int:
    return os.open(path, _CREATE_NEW, 0o666)  # the user's umask applies, as with open()


def claim(
    folder: Path, prefix: str, extension: str = "png", field: str = "filename_prefix", trailing: bool = True
) -> ClaimedName:
    """Create the next free `<prefix>_NNNNN_.<ext>` under `folder`, exclusively, and hand it over open.

    The caller writes through the claimed name: reopening the empty file to write it would make ext4
    flush it on close (its guard against truncated-then-rewritten files), which costs more than the image.
    """
    target, subfolder, stem = _target(folder, prefix, field)
    filename, fd = _next_free(target, stem, extension, _create_new, trailing)
    return ClaimedName(os.path.join(target, filename), filename, subfolder, fd)


class OutputFenced(ZImageError):
    """The run no longer holds its prompt (a cluster worker whose lease ran out, whose prompt another
    worker took): it writes no final output name."""


@dataclass(frozen=True)
class RunOutputs:
    """Where one run's outputs are journaled (see `output_journal`): the prompt and its journal, and
    `still_held`, asked before each final name is taken (None: the run always holds its prompt)."""

    prompt_id: str
    journal: OutputJournal
    still_held: Callable[[], bool] | None = None


def write_new(
    folder: Path,
    prefix: str,
    data: bytes | memoryview,
    outputs: RunOutputs | None = None,
    extension: str = "png",
    field: str = "filename_prefix",
    trailing: bool = True,
) -> tuple[str, str]:
    """Write `data` under the next free `<prefix>_NNNNN_.<ext>`; (file name, subfolder). With `outputs`,
    the file is journaled so that a run of the same prompt after a crash leaves no second copy."""
    if outputs is None:
        with claim(folder, prefix, extension, field, trailing) as name:
            name.write(data)
        return name.filename, name.subfolder
    target, subfolder, stem = _target(folder, prefix, field)
    own: str | None = _write_own(outputs, target, data)

    def take(path: str) -> None:
        nonlocal own
        if outputs.still_held is not None and not outputs.still_held():
            with contextlib.suppress(OSError):
                if own is not None:
                    os.unlink(own)
            raise OutputFenced(
                f"prompt {outputs.prompt_id} is no longer this worker's (its lease ran out and another worker "
                "took it): its output is not written here"
            )
        if own is not None:
            outputs.journal.note(outputs.prompt_id, path, own)
            try:
                os.link(own, path)
                return
            except FileExistsError:
                raise
            except OSError:  # no hard links here (FAT, some network shares), or the own file is gone with its
                with contextlib.suppress(FileNotFoundError):  # folder: the name is made directly
                    os.unlink(own)
                own = None
        fd = _create_new(path)  # created exclusively and journaled before a byte is written
        try:
            outputs.journal.note(outputs.prompt_id, path, NO_LINK)
            write_all(fd, data)
        finally:
            os.close(fd)

    filename, _ = _next_free(target, stem, extension, take, trailing)
    return filename, subfolder


_own_numbers = itertools.count()


def _write_own(outputs: RunOutputs, target: str, data: bytes | memoryview) -> str:
    """The image written, whole, under a name of the prompt's own in the target folder."""
    while True:
        own = outputs.journal.own_name(outputs.prompt_id, target, next(_own_numbers))
        try:
            fd = _create_new(own)
        except FileExistsError:  # left by an earlier process's run of the same prompt
            continue
        except FileNotFoundError:
            os.makedirs(target, exist_ok=True)
            continue
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
        return own


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of `data`: one system call for a whole encoded image, with no file object around it."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
