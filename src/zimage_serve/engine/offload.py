"""Memory modes on a CUDA card, with accelerate's hooks (the same ones diffusers' offloading uses)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from zimage_serve.engine.devices import MemoryMode, Placement


@dataclass
class OffloadHooks:
    """Model offload keeps one component on the GPU; `offload_all` returns the last one to the host."""

    hooks: list[Any] = field(default_factory=list)

    def offload_all(self) -> None:
        for hook in self.hooks:
            hook.offload()


def apply_memory_mode(placement: Placement, modules: list[torch.nn.Module]) -> OffloadHooks:
    """`modules` in the order a generation calls them: text encoder, transformer, VAE."""
    if placement.memory_mode is MemoryMode.GPU:
        return OffloadHooks()
    from accelerate import cpu_offload, cpu_offload_with_hook

    if placement.memory_mode is MemoryMode.SEQUENTIAL:
        for module in modules:
            cpu_offload(module, execution_device=placement.device)
        return OffloadHooks()
    hooks: list[Any] = []
    previous = None
    for module in modules:
        _, previous = cpu_offload_with_hook(module, placement.device, prev_module_hook=previous)
        hooks.append(previous)
    return OffloadHooks(hooks)
