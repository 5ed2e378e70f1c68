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


def test_a_settled_journal_becomes_the_next_prompts_without_a_file_made_or_freed(tmp_path: Path) -> None:
    out, runs = tmp_path / "out", tmp_path / "runs"
    journal = OutputJournal(runs)
    kept = write_new(out, "img", b"first", RunOutputs("job-1", journal))[0]
    inode = (runs / "job-1.outputs").stat().st_ino
    journal.settle("job-1")
    [spare] = [p for p in runs.iterdir()]
    assert spare.name.startswith(".spare-") and spare.stat().st_size == 0 and journal.journaled() == []
    second = write_new(out, "img", b"second", RunOutputs("job-2", journal))[0]
    assert [p.name for p in runs.iterdir()] == ["job-2.outputs"]
    assert (runs / "job-2.outputs").stat().st_ino == inode  # the same file, holding job 2's entry only
    assert journal.undo("job-2") == 1
    assert sorted(p.name for p in out.iterdir()) == [kept] and (out / kept).read_bytes() == b"first"
    assert second != kept and list(runs.iterdir()) == []


def test_a_journal_left_by_an_earlier_run_is_appended_to_not_replaced_by_a_spare(tmp_path: Path) -> None:
    out, runs = tmp_path / "out", tmp_path / "runs"
    crashed = write_new(out, "img", b"crashed run", RunOutputs("job-1", OutputJournal(runs)))[0]
    journal = OutputJournal(runs)  # the next process
    write_new(out, "other", b"x", RunOutputs("job-0", journal))
    journal.settle("job-0")
    write_new(out, "img", b"second run", RunOutputs("job-1", journal))
    assert journal.undo("job-1") == 2 and not (out / crashed).exists()


def test_spares_an_ended_process_left_are_removed_once_an_hour_old(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    old, fresh = runs / ".spare-gone-0", runs / ".spare-alive-0"
    old.touch()
    fresh.touch()
    os.utime(old, (0, 0))
    write_new(tmp_path / "out", "img", b"1", RunOutputs("job-1", OutputJournal(runs)))
    assert sorted(p.name for p in runs.iterdir()) == [".spare-alive-0", "job-1.outputs"]


def test_without_hard_links_settled_journals_are_deleted_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, runs = tmp_path / "out", tmp_path / "runs"
    journal = OutputJournal(runs)
    write_new(out, "img", b"1", RunOutputs("job-1", journal))
    journal.settle("job-1")

    def no_links(source: str, target: str) -> None:
        raise PermissionError("hard links are not supported here")

    monkeypatch.setattr(os, "link", no_links)
    name = write_new(out, "img", b"2", RunOutputs("job-2", journal))[0]
    journal.settle("job-2")
    assert list(runs.iterdir()) == [] and (out / name).read_bytes() == b"2"


def test_a_run_whose_prompt_another_worker_took_leaves_that_workers_journal_alone(tmp_path: Path) -> None:
    """Worker A's lease ran out mid-run; worker B took the prompt, undid A's files and journals its own.
    A's settle (its end is fenced) must neither take B's journal as a spare nor delete it."""
    out, runs = tmp_path / "out", tmp_path / "runs"
    stale, taker = OutputJournal(runs), OutputJournal(runs)
    write_new(out, "img", b"A's image", RunOutputs("job-p", stale))
    assert taker.undo("job-p") == 1
    b_image = write_new(out, "img", b"B's image", RunOutputs("job-p", taker))[0]
    stale.settle("job-p")
    assert (runs / "job-p.outputs").read_text().startswith(str(out / b_image))
    write_new(out, "other", b"A's next", RunOutputs("job-q", stale))  # a new journal, not B's
    assert str(out / b_image) not in (runs / "job-q.outputs").read_text()
    assert taker.undo("job-p") == 1 and not (out / b_image).exists()


def test_a_spare_removed_by_another_process_makes_way_for_a_new_journal(tmp_path: Path) -> None:
    out, runs = tmp_path / "out", tmp_path / "runs"
    journal = OutputJournal(runs)
    write_new(out, "img", b"1", RunOutputs("job-1", journal))
    journal.settle("job-1")
    [spare] = list(runs.iterdir())
    spare.unlink()  # as another process's start removes an old spare
    name = write_new(out, "img", b"2", RunOutputs("job-2", journal))[0]
    assert [p.name for p in runs.iterdir()] == ["job-2.outputs"]
    assert journal.undo("job-2") == 1 and not (out / name).exists()
