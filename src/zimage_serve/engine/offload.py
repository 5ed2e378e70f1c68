"""Memory modes on a CUDA card, with accelerate's hooks (the same ones diffusers' offloading uses)."""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.hooks import ModelHook, add_hook_to_module
from accelerate.utils import send_to_device

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


class ModelSwap:
    """Model offload for components loaded one by one (workflow loader nodes): every member lives in host
    memory, and the one about to run is moved to the accelerator after the others are moved off it.

    The move happens in an accelerate hook, so `forward` and diffusers' `encode`/`decode` (which call the
    hook's `pre_forward` through `apply_forward_hook`) both trigger it. One run at a time: the worker
    runs prompts one by one when offloading (`Placing.concurrency_cap`)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # Weak: a component the executor's cache lets go of (POST /free, eviction) must not live on here.
        self.members: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
        self._lock = threading.Lock()

    def add(self, module: torch.nn.Module) -> torch.nn.Module:
        add_hook_to_module(module, _SwapIn(self))
        with self._lock:
            self.members.add(module)
        return module

    def activate(self, module: torch.nn.Module) -> None:
        with self._lock:
            for other in self.members:
                if other is not module and _device_of(other) == self.device:
                    other.to("cpu")
            if _device_of(module) != self.device:
                module.to(self.device)

    def accompany(self, module: torch.nn.Module) -> None:
        """Bring `module` onto the card beside the active member (a ControlNet beside its transformer); the
        next member to become active moves it off again."""
        with self._lock:
            self.members.add(module)
            if _device_of(module) != self.device:
                module.to(self.device)


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


class _SwapIn(ModelHook):  # type: ignore[misc]
    def __init__(self, swap: ModelSwap) -> None:
        super().__init__()
        self.swap = swap

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        self.swap.activate(module)
        return send_to_device(args, self.swap.device), send_to_device(kwargs, self.swap.device)


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where `module` computes: its offload hook's device (model offload keeps its weights in host memory
    between calls), else where its weights are, unless they are on accelerate's meta device (sequential
    offload streams them in per call, through hooks on the submodules that hold them)."""
    hook = getattr(module, "_hf_hook", None)
    if isinstance(hook, _SwapIn):
        return hook.swap.device
    weights = next(module.parameters()).device
    if weights.type != "meta":
        return weights  # the common case, once per step: no walk over the modules
    for part in module.modules():
        device = getattr(getattr(part, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device)
    return weights
