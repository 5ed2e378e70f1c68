"""Output names: ComfyUI's pattern, subfolders and dates, no collisions, nothing outside the folder."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import threading
from pathlib import Path

import pytest

from zimage_serve.errors import InvalidParameterError
from zimage_serve.workflow.naming import claim, expand_prefix


def test_counter_continues_after_what_is_there(tmp_path: Path) -> None:
    (tmp_path / "ComfyUI_00007_.png").write_bytes(b"")
    (tmp_path / "Other_00020_.png").write_bytes(b"")
    with claim(tmp_path, "ComfyUI") as first:
        assert (first.filename, first.subfolder) == ("ComfyUI_00008_.png", "")
    assert taken(tmp_path, "ComfyUI") == "ComfyUI_00009_.png"
    (tmp_path / "ComfyUI_00010_.png").write_bytes(b"")  # another process wrote meanwhile
    assert taken(tmp_path, "ComfyUI") == "ComfyUI_00011_.png"


def taken(folder: Path, prefix: str) -> str:
    with claim(folder, prefix) as name:
        return name.filename


def test_the_claimed_file_is_written_through_the_claim_and_closed_after(tmp_path: Path) -> None:
    with claim(tmp_path, "out") as name:
        assert Path(name.path).read_bytes() == b""  # created empty, before anything is written
        name.write(b"image ")
        name.write(memoryview(b"bytes"))
    assert Path(name.path).read_bytes() == b"image bytes"
    with pytest.raises(OSError):  # closed with the block
        os.fstat(name.fd)


def test_subfolders_and_dates(tmp_path: Path) -> None:
    with claim(tmp_path, "portraits/zimage") as name:
        assert (name.subfolder, name.filename) == ("portraits", "zimage_00001_.png") and Path(name.path).is_file()
    when = dt.datetime(2026, 11, 26, 9, 5, 3)
    assert expand_prefix("%date:yyyy-MM-dd%/img_%hour%%minute%", when) == "2026-11-26/img_0905"


@pytest.mark.parametrize("prefix", ["../escape", "/etc/x", "a/../../b", "", "a\x00b"])
def test_prefixes_that_leave_the_folder_are_refused(tmp_path: Path, prefix: str) -> None:
    with pytest.raises(InvalidParameterError, match="filename_prefix"):
        claim(tmp_path / "out", prefix)


def test_concurrent_claims_never_collide(tmp_path: Path) -> None:
    names: list[str] = []

    def take() -> None:
        for _ in range(50):
            names.append(taken(tmp_path, "job"))

    threads = [threading.Thread(target=take) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(names) == len(set(names)) == 200


def test_a_symlinked_subfolder_pointing_out_is_refused_before_anything_is_created(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "link").symlink_to(outside)
    with pytest.raises(InvalidParameterError, match="leads outside"):
        claim(tmp_path / "out", "link/deeper/x")
    assert list(outside.iterdir()) == []


def test_a_folder_removed_after_first_use_is_made_again(tmp_path: Path) -> None:
    assert taken(tmp_path / "out", "sub/x") == "x_00001_.png"
    shutil.rmtree(tmp_path / "out")
    assert taken(tmp_path / "out", "sub/x") == "x_00002_.png"  # the counter continues; the folder is back
    assert (tmp_path / "out" / "sub" / "x_00002_.png").is_file()
