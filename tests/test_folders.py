"""File lists for Combo inputs: kept between prompts, read again as soon as a directory changes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from zimage_serve.workflow.folders import Folders, UnknownFileError

HOUR_NS = 3600 * 10**9


def age(*directories: Path) -> None:
    """Date directories an hour back, so their listings count as settled."""
    past = time.time_ns() - HOUR_NS
    for directory in directories:
        os.utime(directory, ns=(past, past))


def test_a_settled_listing_is_reused_and_a_change_anywhere_below_is_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "models"
    nested = root / "loras" / "styles"
    nested.mkdir(parents=True)
    (nested / "a.safetensors").touch()
    folders = Folders(models=[root])
    age(root / "loras", nested)
    assert folders.names("loras") == ["styles/a.safetensors"]

    walks = 0
    real_rglob = Path.rglob

    def counting_rglob(self: Path, pattern: str) -> object:
        nonlocal walks
        walks += 1
        return real_rglob(self, pattern)

    monkeypatch.setattr(Path, "rglob", counting_rglob)
    assert folders.names("loras") == ["styles/a.safetensors"]
    assert walks == 0
    (nested / "b.safetensors").touch()  # two levels down: only `styles` changes its mtime
    assert folders.names("loras") == ["styles/a.safetensors", "styles/b.safetensors"]
    assert walks == 1


def test_a_folder_created_later_is_listed(tmp_path: Path) -> None:
    folders = Folders(models=[tmp_path / "models"], input=tmp_path / "input")
    assert folders.names("loras") == [] and folders.names("input_images") == []
    (tmp_path / "models" / "loras").mkdir(parents=True)
    (tmp_path / "models" / "loras" / "x.safetensors").touch()
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / "photo.png").touch()
    assert folders.names("loras") == ["x.safetensors"]
    assert folders.names("input_images") == ["photo.png"]


def test_a_listing_of_a_directory_changed_just_now_is_not_trusted(tmp_path: Path) -> None:
    folder = tmp_path / "input"
    folder.mkdir()
    (folder / "first.png").touch()
    folders = Folders(input=folder)
    stamp = folder.stat().st_mtime_ns
    assert folders.names("input_images") == ["first.png"]
    (folder / "second.png").touch()
    os.utime(folder, ns=(stamp, stamp))  # a coarse clock: the second change did not move the mtime
    assert folders.names("input_images") == ["first.png", "second.png"]


def test_removing_a_file_is_seen(tmp_path: Path) -> None:
    folder = tmp_path / "input"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        (folder / name).touch()
    age(folder)
    folders = Folders(input=folder)
    assert folders.names("input_images") == ["a.png", "b.png"]
    (folder / "a.png").unlink()
    assert folders.names("input_images") == ["b.png"]


@pytest.mark.parametrize(
    "name", ["../secret.png", "a/../../x.png", "..\\x.png", "/etc/passwd", "\\x.png", "", "a\x00.png"]
)
def test_input_names_that_leave_the_folder_are_refused_by_both_lookups(tmp_path: Path, name: str) -> None:
    folders = Folders.default(tmp_path)
    with pytest.raises(UnknownFileError):
        folders.input_file(name)
    with pytest.raises(UnknownFileError):
        folders.input_path(name)


def test_input_file_names_the_place_without_looking_and_input_path_looks(tmp_path: Path) -> None:
    folders = Folders.default(tmp_path)
    (folders.input / "sub").mkdir(parents=True)
    (folders.input / "sub" / "a.png").write_bytes(b"x")
    assert folders.input_file("sub/a.png") == str(folders.input / "sub" / "a.png")
    assert folders.input_path("sub/a.png") == folders.input / "sub" / "a.png"
    assert folders.input_file("missing.png") == str(folders.input / "missing.png")
    with pytest.raises(UnknownFileError):
        folders.input_path("missing.png")
