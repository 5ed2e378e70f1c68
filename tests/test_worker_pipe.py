"""What the worker process tells the server through its pipe: every event while a socket listens, and a
job's end at once while someone waits for it; otherwise job ends are held briefly and sent together."""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass

from zimage_serve.metrics import JobEnd
from zimage_serve.worker import process
from zimage_serve.worker.messages import JobEnded, JobEvent


@dataclass
class Shared:  # what multiprocessing.Value gives the child: a number to read
    value: int = 0


def test_a_job_end_nobody_waits_for_is_held_then_sent_with_the_next_ones() -> None:
    server_end, child_end = multiprocessing.Pipe(duplex=True)
    audience, wanted = Shared(), Shared()
    listener = process._PipeListener(child_end, audience, wanted)
    for job in ("a", "b"):
        listener.job_event(job, None, "executing", {"node": "9", "prompt_id": job})  # nobody listens: not sent
        listener.ended(JobEnd("success", 0.01, 0.0, {"SaveImage": 1}))
        listener.job_event(job, None, "execution_success", {"prompt_id": job})
    assert not server_end.poll(process.HOLD_S / 2)  # held
    assert server_end.poll(30)
    batch = server_end.recv()
    assert [(type(m).__name__, getattr(m, "prompt_id", None)) for m in batch] == [
        ("JobEnded", None),
        ("JobEvent", "a"),
        ("JobEnded", None),
        ("JobEvent", "b"),
    ]

    wanted.value = 1  # a route waits for its job: its end goes at once, with what was held before it
    listener.ended(JobEnd("error", 0.01, 0.0, {}))
    listener.job_event("c", "client", "execution_error", {"prompt_id": "c"})
    assert server_end.poll(0)
    [ended, closing] = server_end.recv()
    assert isinstance(ended, JobEnded) and ended.end.outcome == "error"
    assert isinstance(closing, JobEvent) and closing.event == "execution_error" and closing.client_id == "client"

    wanted.value, audience.value = 0, 1  # a socket listens: every event goes at once
    listener.job_event("d", None, "executing", {"node": "9", "prompt_id": "d"})
    assert server_end.poll(0) and [m.event for m in server_end.recv()] == ["executing"]
    child_end.close()
    server_end.close()
