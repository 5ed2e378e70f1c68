"""Stopping inside one model call: a check before every block of the transformer and the VAE.

A 2048² image on a CPU spends minutes inside one transformer or VAE call, so a check between sampler
steps is not enough for /interrupt or a job timeout. Every module inside a ModuleList of a loaded model
(the transformer's layers and refiners, the VAE's up and down blocks and their resnets) gets a forward
pre-hook that asks the calling thread's cancel check, and raises GenerationCancelled when it says so.

The hooks are installed once per model and read the check from the calling thread, so runs sharing one
loaded model (concurrency 2) each stop only for their own interrupt.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from zimage_serve.errors import GenerationCancelled

CancelCheck = Callable[[], bool]
_current = threading.local()
_INSTALLED = "_zimage_cancel_hooks"


def _check(module: torch.nn.Module, args: Any) -> None:
    cancel: CancelCheck | None = getattr(_current, "cancel", None)
    if cancel is not None and cancel():
        raise GenerationCancelled("interrupted inside a model call")


def install(model: torch.nn.Module) -> torch.nn.Module:
    """Give every block of `model` the check (once; a model seen before is left as it is)."""
    if not getattr(model, _INSTALLED, False):
        for module in model.modules():
            if isinstance(module, torch.nn.ModuleList):
                for block in module:
                    block.register_forward_pre_hook(_check)
        setattr(model, _INSTALLED, True)
    return model


@contextmanager
def cancellable(cancel: CancelCheck | None) -> Iterator[None]:
    """Within the block, model calls on this thread stop at the next block once `cancel()` is true."""
    previous = getattr(_current, "cancel", None)
    _current.cancel = cancel
    try:
        yield
    finally:
        _current.cancel = previous
