"""Where a model's components run: the device, their dtypes, the memory mode, the fast path, and (under
smart memory) the residency that shares the card between them. One value for the loader nodes of a
workflow and for a model loaded whole (`engine/loader.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from zimage_serve.engine.activations import Activation
from zimage_serve.engine.devices import (
    TURBO_BF16_BYTES,
    MemoryMode,
    describe_memory_mode,
    dtype_name,
    load_device,
    pick_device,
    pick_dtypes,
    pick_memory_mode,
)
from zimage_serve.engine.fastpath import FastPath, for_smart_memory
from zimage_serve.engine.residency import Residency


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype  # transformer and text encoder
    vae_dtype: torch.dtype  # never fp16: the Flux VAE overflows to black images in it
    memory_mode: MemoryMode = MemoryMode.GPU
    weight_dtype: str = "default"  # the transformer's: default, or an FP8 kind (engine/fp8.py)
    fast: FastPath = field(default_factory=FastPath)
    residency: Residency | None = field(default=None, compare=False)  # the components sharing the card (smart)

    @classmethod
    def choose(
        cls, device: str = "auto", dtype: str = "auto", fast: FastPath | None = None, memory_mode: str = "auto"
    ) -> Placement:
        """For components loaded one by one (a workflow's loader nodes). `memory_mode` auto: everything on the
        card where Z-Image-Turbo in bf16 and the activations of the largest default image fit in its free
        memory, smart memory otherwise; always all-on-device off CUDA."""
        target = pick_device(device)
        model_dtype, vae_dtype = pick_dtypes(target, dtype)
        mode = pick_memory_mode(target, memory_mode, TURBO_BF16_BYTES)
        fast = FastPath() if fast is None else fast
        return cls(target, model_dtype, vae_dtype, mode, fast=fast).with_memory_mode(mode)

    def with_memory_mode(self, mode: MemoryMode) -> Placement:
        """This placement under `mode`: smart memory brings a residency for the card (and its own fast path)."""
        if mode is MemoryMode.GPU:
            return replace(self, memory_mode=mode, residency=None)
        residency = self.residency if self.residency is not None else Residency(self.device)
        return replace(self, memory_mode=mode, fast=for_smart_memory(self.fast), residency=residency)

    @property
    def load_device(self) -> torch.device:
        return load_device(self.device, self.memory_mode)

    def on_cpu(self) -> Placement:
        """The same fast path, all on the CPU in fp32 (CLIPLoader's device "cpu")."""
        cpu = torch.device("cpu")
        return replace(self, device=cpu, dtype=torch.float32, memory_mode=MemoryMode.GPU, residency=None)

    def concurrency_cap(self, requested: int) -> int:
        """Prompts that may run at once: smart memory moves shared components on and off the card, so one."""
        return requested if self.memory_mode is MemoryMode.GPU else 1

    def place(self, module: Any, name: str, activation: Activation, one_pass: bool = False) -> Any:
        """Hand a freshly loaded component (loaded on `load_device`) to smart memory, when it is in use."""
        if self.residency is not None:
            self.residency.add(module, name, activation, one_pass)
        return module

    def describe(self) -> str:
        mode = describe_memory_mode(self.memory_mode, self.device)
        weights = "" if self.weight_dtype == "default" else f", transformer weights {self.weight_dtype}"
        return (
            f"device {self.device}, dtype {dtype_name(self.dtype)} "
            f"(VAE {dtype_name(self.vae_dtype)}){weights}, memory mode: {mode}"
        )
