"""Where templates live: the built-ins, `<data-dir>/templates/`, and each user's own below it.

A template is a folder of versions, `<name>/v<N>.json`, each written once and never changed, so an old
version stays reachable by its number and a pipeline pinned to it keeps rendering the same graph.
Adding makes the next version, unless the content equals the latest (then that version is answered).

With users, an admin's (and the local operator's) templates are the shared ones; a user's are under
`users/<user>/`, and a user sees their own, then the shared ones, then the built-ins.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from zimage_serve.templates.builtin import builtin, builtin_names
from zimage_serve.templates.document import Template, TemplateError, check_name

USERS = "users"  # as in the file folders: one folder per user below the shared ones
VERSION = re.compile(r"^v([1-9][0-9]{0,8})\.json$")


class TemplateNotFound(TemplateError):
    pass


@dataclass(frozen=True)
class Added:
    template: Template
    created: bool  # False: the content equalled the latest version, which is answered instead


class TemplateLibrary:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _folders(self, user: str | None) -> list[Path]:
        """Where `user` reads, in order of precedence; the first is where they write."""
        shared = self.root
        return [shared / USERS / user, shared] if user else [shared]

    # -- reading -----------------------------------------------------------------------------------
    def names(self, user: str | None = None) -> list[str]:
        found: list[str] = []
        for folder in self._folders(user):
            if folder.is_dir():
                for entry in sorted(folder.iterdir()):
                    if entry.name != USERS and entry.name not in found and self._versions(entry):
                        found.append(entry.name)
        found.extend(name for name in builtin_names() if name not in found)
        return found

    def versions(self, name: str, user: str | None = None) -> list[int]:
        folder = self._folder_of(name, user)
        if folder is None:
            return [1] if builtin(name) is not None else []
        return self._versions(folder)

    def get(self, name: str, version: int | None = None, user: str | None = None) -> Template:
        folder = self._folder_of(name, user)
        if folder is None:
            found = builtin(name)
            if found is None:
                known = ", ".join(self.names(user))
                raise TemplateNotFound(f"template {name!r} does not exist; there are {known}")
            if version not in (None, 1):
                raise TemplateNotFound(f"template {name} is built in and has only version 1")
            return found
        versions = self._versions(folder)
        number = version if version is not None else versions[-1]
        if number not in versions:
            raise TemplateNotFound(f"template {name} has no version {number}; it has {_listed(versions)}")
        return self._read(folder / f"v{number}.json", name, number)

    def catalogue(self, user: str | None = None) -> list[dict[str, Any]]:
        entries = []
        for name in self.names(user):
            latest = self.get(name, user=user)
            entries.append({**latest.summary(), "versions": self.versions(name, user)})
        return entries

    # -- writing -----------------------------------------------------------------------------------
    def add(self, template: Template, user: str | None = None) -> Added:
        """Store `template` as the next version of its name (in `user`'s own folder)."""
        name = check_name(template.name)
        if builtin(name) is not None:
            raise TemplateError(f"name: {name} is built in; give your template another name")
        if name == USERS:
            raise TemplateError(f"name: {USERS!r} is reserved")
        folder = self._folders(user)[0] / name
        folder.mkdir(parents=True, exist_ok=True)
        while True:
            versions = self._versions(folder)
            if versions:
                latest = self._read(folder / f"v{versions[-1]}.json", name, versions[-1])
                if latest.same_content(template):
                    return Added(latest, created=False)
            number = versions[-1] + 1 if versions else 1
            made = replace(template, version=number, created=time.time(), builtin=False)
            if _write_once(folder / f"v{number}.json", made.to_json()):
                return Added(made, created=True)
            # another writer took this number first: look again

    # -- inside ------------------------------------------------------------------------------------
    def _folder_of(self, name: str, user: str | None) -> Path | None:
        check_name(name)
        for folder in self._folders(user):
            if name != USERS and self._versions(folder / name):
                return folder / name
        return None

    @staticmethod
    def _versions(folder: Path) -> list[int]:
        try:
            entries = os.listdir(folder)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(int(m.group(1)) for m in map(VERSION.match, entries) if m)

    @staticmethod
    def _read(path: Path, name: str, version: int) -> Template:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise TemplateError(f"{path}: cannot be read ({exc})") from None
        try:
            return Template.from_json(data, name=name, version=version)
        except TemplateError as exc:
            raise TemplateError(f"{path}: {exc}") from None


def _write_once(path: Path, data: dict[str, Any]) -> bool:
    """Write `path` whole, or not at all if it exists: a new name linked to a finished file."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(data, file, ensure_ascii=False, indent=1)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        return True
    finally:
        os.unlink(temporary)


def _listed(versions: list[int]) -> str:
    return ", ".join(map(str, versions)) if len(versions) <= 8 else f"1 to {versions[-1]}"
