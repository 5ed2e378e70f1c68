"""Building torch modules, one at a time in a process.

accelerate's `init_empty_weights` builds a model with no memory behind its parameters by patching
`torch.nn.Module.register_parameter` for the whole process, not for the calling thread: a module another
thread builds meanwhile (a second job's model with `--concurrency 2`, an upscaler, a second server in the
same process) would get meta parameters too, and fail far from the cause. So every module the engine builds
is built under one lock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_building = threading.RLock()


@contextmanager
def building(*, empty: bool = False) -> Iterator[None]:
    """Build modules in this block alone; with `empty`, their parameters on the meta device (buffers stay
    real, so derived tables such as RoPE's are kept)."""
    with _building:
        if not empty:
            yield
            return
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            yield
