"""POST /prompt's submissions stored in bursts: one commit for those handled in the same turn of the loop."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from zimage_serve.queue.jobs import DuplicateJob, QueueFull
from zimage_serve.queue.sqlite_queue import SQLiteQueue
from zimage_serve.server.service import PromptRejected, QueueService
from zimage_serve.server.submissions import SubmissionBatcher
from zimage_serve.workflow.folders import Folders
from zimage_serve.workflow.nodes import NODES
from zimage_serve.workflow.validate import Validator


class CountingWorker:
    """Stands in for the device worker: counts wake-ups, one per stored burst."""

    def __init__(self) -> None:
        self.notified = 0

    def notify(self) -> None:
        self.notified += 1


def graph(prefix: str) -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


@pytest.fixture
def batcher(tmp_path: Path) -> SubmissionBatcher:
    folders = Folders.default(tmp_path / "data", [])
    folders.input.mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(folders.input / "in.png")
    store = SQLiteQueue(tmp_path / "data" / "queue.sqlite3", max_pending=12)
    service = QueueService(store, Validator(NODES, folders), CountingWorker(), folders)  # type: ignore[arg-type]
    return SubmissionBatcher(service)


def test_concurrent_submissions_are_stored_in_one_burst_each_with_its_own_answer(batcher: SubmissionBatcher) -> None:
    taken = str(uuid.uuid4())
    broken = graph("x")
    broken["2"]["inputs"]["images"] = ["9", 0]  # a link to no node: this one alone fails validation

    async def burst() -> list[Any]:
        requests = [batcher.submit(graph(f"ok{i}")) for i in range(3)]
        requests += [batcher.submit(broken), batcher.submit(graph("a"), prompt_id=taken)]
        requests += [batcher.submit(graph("b"), prompt_id=taken, client_id="c1")]
        return await asyncio.gather(*requests, return_exceptions=True)

    answers = asyncio.run(burst())
    kinds = [type(a).__name__ for a in answers]
    assert kinds == ["Submitted"] * 3 + ["PromptRejected", "Submitted", "DuplicateJob"]
    service = batcher.service
    assert service.worker.notified == 1  # type: ignore[attr-defined]  # one burst, one commit, one wake-up
    stored = service.store.pending()
    assert [job.id for job in stored] == [a.job.id for a in answers if not isinstance(a, Exception)]
    assert stored[-1].id == taken and "client_id" not in stored[-1].extra_data  # the first one with the id kept it
    assert isinstance(answers[3], PromptRejected) and answers[3].body["node_errors"]


def test_a_full_queue_refuses_the_rest_of_a_burst(batcher: SubmissionBatcher) -> None:
    async def burst() -> list[Any]:
        return await asyncio.gather(*(batcher.submit(graph(f"j{i}")) for i in range(15)), return_exceptions=True)

    answers = asyncio.run(burst())
    assert [isinstance(a, QueueFull) for a in answers] == [False] * 12 + [True] * 3
    assert batcher.service.store.count("pending") == 12


def test_submissions_in_separate_turns_are_stored_separately(batcher: SubmissionBatcher) -> None:
    async def one_by_one() -> None:
        for i in range(3):
            await batcher.submit(graph(f"s{i}"))
        with pytest.raises(DuplicateJob):
            job_id = batcher.service.store.pending()[0].id
            await batcher.submit(graph("again"), prompt_id=job_id)

    asyncio.run(one_by_one())
    assert batcher.service.worker.notified == 4  # type: ignore[attr-defined]
