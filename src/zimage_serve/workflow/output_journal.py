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
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

_PLAIN_ID = re.compile(r"[0-9A-Za-z-]{1,64}")
_CREATE_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
_APPEND = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_BINARY", 0)
SUFFIX = ".outputs"
NO_LINK = "-"  # in place of the own name: the final name was created directly


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


class OutputJournal:
    """The journals of one data dir's running prompts; shared by every run of an executor (thread-safe).

    A prompt's journal stays open while it runs and what it notes is kept in memory too, so its end
    costs no reading; a journal left by another process (a crash) is read back from its file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = threading.Lock()
        self._made = False
        self._open: dict[str, _Open] = {}

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
                    self._made = True
                journal = self._open[prompt_id] = _Open(os.open(self.path(prompt_id), _APPEND, 0o600))
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
        noted nothing in this process costs nothing here."""
        journal = self._close(prompt_id)
        if journal is not None:
            self._drop(prompt_id, journal.entries)

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
        for own in {own for _, own in entries if own != NO_LINK}:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(own)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(prompt_id))
