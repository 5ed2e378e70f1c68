"""The output journal: a re-run removes exactly what its unfinished run wrote, and never another's file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from zimage_serve.workflow.naming import RunOutputs, write_new
from zimage_serve.workflow.output_journal import OutputJournal


def test_an_unfinished_run_is_undone_and_a_settled_one_kept(tmp_path: Path) -> None:
    out, journal = tmp_path / "out", OutputJournal(tmp_path / "runs")
    first = RunOutputs("job-1", journal)
    names = [write_new(out, "img", b"png %d" % i, first)[0] for i in range(2)]
    other = write_new(out, "img", b"someone else's", None)[0]  # not journaled: another writer's file
    assert names == ["img_00001_.png", "img_00002_.png"] and other == "img_00003_.png"
    assert len(list(out.glob(".*.part"))) == 2 and journal.journaled() == ["job-1"]
    assert journal.undo("job-1") == 2
    assert sorted(p.name for p in out.iterdir()) == ["img_00003_.png"] and journal.journaled() == []
    again = write_new(out, "img", b"png again", first)[0]
    journal.settle("job-1")
    assert sorted(p.name for p in out.iterdir()) == ["img_00003_.png", again]
    assert (out / again).read_bytes() == b"png again" and not (tmp_path / "runs" / "job-1.outputs").exists()


def test_a_final_name_replaced_by_another_file_is_left_alone(tmp_path: Path) -> None:
    out, journal = tmp_path / "out", OutputJournal(tmp_path / "runs")
    name = write_new(out, "img", b"mine", RunOutputs("job-2", journal))[0]
    (out / name).unlink()
    (out / name).write_bytes(b"written by someone after mine was deleted")
    assert journal.undo("job-2") == 0 and (out / name).read_bytes().startswith(b"written by someone")


def test_odd_prompt_ids_get_safe_journal_names(tmp_path: Path) -> None:
    journal = OutputJournal(tmp_path / "runs")
    write_new(tmp_path / "out", "x", b"1", RunOutputs("../../etc/passwd", journal))
    [name] = journal.journaled()
    assert "/" not in name and (tmp_path / "runs" / f"{name}.outputs").is_file()


def test_without_hard_links_the_final_name_is_journaled_and_undone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(source: str, target: str) -> None:
        raise PermissionError("hard links are not supported here")

    monkeypatch.setattr(os, "link", no_links)
    out, journal = tmp_path / "out", OutputJournal(tmp_path / "runs")
    out.mkdir()
    (out / "img_00001_.png").write_bytes(b"someone else's")
    name = write_new(out, "img", b"mine", RunOutputs("job-3", journal))[0]
    assert name == "img_00002_.png" and (out / name).read_bytes() == b"mine"
    assert not list(out.glob(".*.part"))
    assert journal.undo("job-3") == 1
    assert sorted(p.name for p in out.iterdir()) == ["img_00001_.png"]
