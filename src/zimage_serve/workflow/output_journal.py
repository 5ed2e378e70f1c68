"""Exactly one file per output, even when a prompt is run again after a crash.

A prompt's image is first written under a name of its own in the target folder (`.<prompt>-<n>.part`),
then the final name is noted in the prompt's journal (`<journal folder>/<prompt>.outputs`), then the
file is hard-linked to that name, which fails rather than replace a file already there. The own name
stays until the prompt's end is recorded (`settle`): while both names are the same file, the final
one is provably this prompt's. When a prompt is run again after a crash (`undo`), every final name
that is still the same file as its own name is removed, and so are the own names: the new run writes
each image once, and no file another prompt wrote is ever touched.

On a file system without hard links the final name is created exclusively and noted before a byte is
written: a crash between the two can leave an empty file behind, never an image.

A settled journal is not deleted: it is emptied and renamed to a spare name of this process
(`.spare-<process>-<n>`), and the next prompt's journal is that file linked to its own name. Creating and
deleting a file per prompt would make ext4 (without its journal, as on many cloud disks) look through every
recently freed inode each time it makes a new file, the prompt's images included: at a thousand small jobs a
second that cost a tenth of a millisecond per job. Spares untouched for an hour are removed by the next
process to note an output (a live process whose spare went makes a new journal instead). Where an open file
cannot be renamed (Windows) or linked (file systems without hard links), journals are made and deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

_PLAIN_ID = re.compile(r"[0-9A-Za-z-]{1,64}")
_CREATE_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
_APPEND = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_BINARY", 0)
SUFFIX = ".outputs"
NO_LINK = "-"  # in place of the own name: the final name was created directly
SPARE_PREFIX = ".spare-"
MAX_SPARES = 8  # as many as prompts run at once in one process, for the usual concurrency
SPARE_AGE_S = 3600.0  # a spare untouched this long is removed (its process, if alive, makes a new journal)


def journal_folder(data_dir: Path) -> Path:
    """Where the journals of a data dir's prompts are: in the data dir, so that every worker sharing it
    (a cluster's) finds what another's run of a prompt wrote."""
    return data_dir / "runs"


def journal_name(prompt_id: str) -> str:
    """A file name for the prompt's journal (ids are UUIDs; anything else is hashed)."""
    if _PLAIN_ID.fullmatch(prompt_id):
        return prompt_id
    return "h" + hashlib.blake2b(prompt_id.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


@dataclass
class _Open:
    """A running prompt's journal in this process: its open file and what it noted."""

    fd: int
    entries: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class _Spare:
    """An emptied journal kept open under a spare name, to become the next prompt's journal."""

    path: str
    fd: int


class OutputJournal:
    """The journals of one data dir's running prompts; shared by every run of an executor (thread-safe).

    A prompt's journal stays open while it runs and what it notes is kept in memory too, so its end
    costs no reading; a journal left by another process (a crash) is read back from its file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = threading.Lock()
        self._made = False
        self._open: dict[str, _Open] = {}
        self._spares: list[_Spare] = []
        self._reuse = True  # False once linking a spare failed: no hard links here
        self._spare_prefix = f"{SPARE_PREFIX}{uuid.uuid4().hex[:12]}-"
        self._spare_numbers = itertools.count()

    def path(self, prompt_id: str) -> str:
        return os.path.join(self.folder, journal_name(prompt_id) + SUFFIX)

    def journaled(self) -> list[str]:
        """The journal names (prompt ids, when they are plain) of prompts whose end was not settled."""
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        return sorted(n.removesuffix(SUFFIX) for n in names if n.endswith(SUFFIX))

    def note(self, prompt_id: str, final: str, own: str) -> None:
        """Record, before the link is made, that `own` is about to become `final` (written to the file at
        once: a crash right after must find it)."""
        with self._lock:
            journal = self._open.get(prompt_id)
            if journal is None:
                if not self._made:
                    os.makedirs(self.folder, exist_ok=True)
                    self._remove_old_spares()
                    self._made = True
                journal = self._open[prompt_id] = _Open(self._journal_file(self.path(prompt_id)))
            journal.entries.append((final, own))
        os.write(journal.fd, f"{final}\t{own}\n".encode("utf-8", "surrogateescape"))

    def own_name(self, prompt_id: str, folder: str, index: int) -> str:
        return os.path.join(folder, f".{journal_name(prompt_id)}-{index}.part")

    def undo(self, prompt_id: str) -> int:
        """Remove what an unfinished run of the prompt wrote; the number of final files removed."""
        self._close(prompt_id)
        removed = 0
        entries = self._entries(prompt_id)
        for final, own in entries:
            if own == NO_LINK:  # created exclusively by this prompt, then noted: it is the prompt's
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(final)
                    removed += 1
                continue
            try:
                if os.path.samefile(final, own):
                    os.unlink(final)
                    removed += 1
            except OSError:
                pass
        self._drop(prompt_id, entries)
        if removed:
            log.warning("prompt %s is run again: removed the %d file(s) its unfinished run wrote", prompt_id, removed)
        return removed

    def settle(self, prompt_id: str) -> None:
        """The prompt's end is recorded: its final files stay, its own names and journal go. A prompt that
        noted nothing in this process costs nothing here. Only this run's journal file goes: a run whose
        lease ran out, and whose prompt another worker took meanwhile, finds that worker's journal under
        the name, and leaves it alone."""
        with self._lock:
            journal = self._open.pop(prompt_id, None)
        if journal is None:
            return
        self._drop_own(journal.entries)
        path, mine = self.path(prompt_id), os.fstat(journal.fd)
        with self._lock:
            if self._reuse and len(self._spares) < MAX_SPARES and _is(mine, path):
                spare = os.path.join(self.folder, f"{self._spare_prefix}{next(self._spare_numbers)}")
                try:
                    os.rename(path, spare)  # first: the prompt has no journal any more, then it is emptied
                except OSError as exc:  # Windows renames no open file: deleted below, as before
                    log.debug("journal %s not kept as a spare: %s", path, exc)
                else:
                    if self._keep_spare(journal.fd, mine, spare, path):
                        return
        os.close(journal.fd)
        if _is(mine, path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _keep_spare(self, fd: int, mine: os.stat_result, spare: str, path: str) -> bool:
        """Under the lock, `path` just renamed to `spare`: emptied and kept if it is this run's journal;
        otherwise (another process made a new one between the look and the rename) put back."""
        if not _is(mine, spare):
            with contextlib.suppress(FileExistsError):
                os.link(spare, path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(spare)
            return False
        try:
            os.ftruncate(fd, 0)
        except OSError as exc:
            log.debug("journal %s not kept as a spare: %s", path, exc)
            os.unlink(spare)
            return False
        self._spares.append(_Spare(spare, fd))
        return True

    def settle_left_over(self, prompt_id: str) -> None:
        """As `settle`, for a journal another process left (its end was recorded just before a crash)."""
        self._drop(prompt_id, self._entries(prompt_id))

    def _close(self, prompt_id: str) -> _Open | None:
        with self._lock:
            journal = self._open.pop(prompt_id, None)
        if journal is not None:
            os.close(journal.fd)
        return journal

    def _entries(self, prompt_id: str) -> list[tuple[str, str]]:
        try:
            with open(self.path(prompt_id), "rb") as file:
                text = file.read().decode("utf-8", "surrogateescape")
        except FileNotFoundError:
            return []
        entries = []
        for line in text.splitlines():
            final, _, own = line.partition("\t")
            if final and own:
                entries.append((final, own))
        return entries

    def _drop(self, prompt_id: str, entries: list[tuple[str, str]]) -> None:
        self._drop_own(entries)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(prompt_id))

    @staticmethod
    def _drop_own(entries: list[tuple[str, str]]) -> None:
        for own in {own for _, own in entries if own != NO_LINK}:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(own)

    def _journal_file(self, path: str) -> int:
        """Under the lock: the open journal at `path`, a spare linked there when one is kept. The link fails
        rather than replace a journal an earlier run of the prompt left: that one is appended to."""
        while self._reuse and self._spares:
            spare = self._spares.pop()
            try:
                os.link(spare.path, path)
            except FileExistsError:
                self._spares.append(spare)
                break
            except FileNotFoundError:  # removed by another process, as an ended one's
                os.close(spare.fd)
                continue
            except OSError:  # no hard links on this file system: journals are made and deleted, as then
                self._reuse = False
                for unused in [spare, *self._spares]:
                    os.close(unused.fd)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(unused.path)
                self._spares.clear()
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(spare.path)
            return spare.fd
        return os.open(path, _APPEND, 0o600)

    def _remove_old_spares(self) -> None:
        """Spares untouched for an hour, mostly of processes that ended (a live one that loses one makes a new
        journal when it next needs one: see `_journal_file`)."""
        old = time.time() - SPARE_AGE_S
        try:
            entries = list(os.scandir(self.folder))
        except OSError:
            return
        for entry in entries:
            if entry.name.startswith(SPARE_PREFIX):
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_mtime < old:
                        os.unlink(entry.path)


def _is(mine: os.stat_result, path: str) -> bool:
    """Whether `path` names the file `mine` was taken from."""
    try:
        return os.path.samestat(mine, os.stat(path))
    except OSError:
        return False
