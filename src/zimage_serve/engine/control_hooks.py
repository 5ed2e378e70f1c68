"""Steering the transformer with Fun ControlNet patches: forward hooks on its refiner and main blocks run
each patch's control stream beside them and add its hints, as ComfyUI wires it (`engine/controlnet.py` says
how). Installed once per transformer; they act only within `steering`, on the thread that asked.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from zimage_serve.engine.control_patch import ControlPatch
from zimage_serve.engine.controlnet import OWN, PATCH, PLAIN
from zimage_serve.engine.resize import repeat_to_batch

if TYPE_CHECKING:
    from zimage_serve.engine.parts import LatentFormat

_steering = threading.local()
_INSTALLED = "_zimage_control_hooks"


class _Stream:
    """One patch's control stream through one transformer call."""

    def __init__(self, patch: ControlPatch, context: torch.Tensor, main_blocks: int) -> None:
        self.patch = patch
        self.net = patch.controlnet.module
        self.variant = patch.controlnet.variant
        self.context = context
        self.every = max(1, round(main_blocks / self.variant.layers))
        self.tokens = (context.shape[-2] // PATCH) * (context.shape[-1] // PATCH)
        self.stream: torch.Tensor | None = None
        self.next_layer = 0
        self.refiner_input: torch.Tensor | None = None
        self.main_input: torch.Tensor | None = None
        self.freqs: torch.Tensor | None = None
        self.adaln: torch.Tensor | None = None

    def start(self, x: torch.Tensor, freqs: torch.Tensor, adaln: torch.Tensor) -> None:
        """At the noise refiner's input: embed the control latent, as the image latent was."""
        n = self.tokens
        batch, channels, height, width = self.context.shape
        patches = self.context.to(x.device, x.dtype).view(batch, channels, height // 2, 2, width // 2, 2)
        tokens = patches.permute(0, 2, 4, 3, 5, 1).reshape(batch, n, 4 * channels)
        stream = self.net.control_all_x_embedder["2-1"](tokens)
        stream = repeat_to_batch(stream, x.shape[0]) if stream.shape[0] != x.shape[0] else stream
        self.refiner_input, self.freqs, self.adaln = x[:, :n], freqs[:, :n], adaln
        if self.variant.refiner == PLAIN:
            for block in self.net.control_noise_refiner:
                stream = block(stream, None, self.freqs, adaln)
        self.stream = stream

    def _step(self, block: Any, x: torch.Tensor) -> torch.Tensor:
        """Advance the stream through one control block; returns its hint."""
        assert self.stream is not None
        given = self.stream if block.block_id == 0 else self.stream[None]  # diffusers' blocks stack their state
        state: torch.Tensor = block(given, x, None, self.freqs, self.adaln)
        hint, self.stream = state.unbind(0)
        return hint * self.patch.strength

    def after_refiner(self, index: int, out: torch.Tensor) -> torch.Tensor:
        assert self.refiner_input is not None
        if self.variant.refiner == PLAIN:
            return out
        if self.variant.refiner == OWN:
            hint = self._step(self.net.control_noise_refiner[index], self.refiner_input)
        elif index == 0:
            hint = self._step(self.net.control_layers[0], self.refiner_input)
        else:  # as ComfyUI runs a broken 2.0: the remaining control layers, the first one's hint
            hints = [self._step(block, self.refiner_input) for block in self.net.control_layers[1:]]
            hint = hints[0] if hints else torch.zeros_like(out[:, : self.tokens])
        return _added(out, hint)

    def after_main(self, index: int, out: torch.Tensor) -> torch.Tensor:
        if index % self.every or index // self.every >= self.variant.layers:
            return out
        assert self.main_input is not None
        layer = index // self.every
        hint = None
        while self.next_layer <= layer:
            hint = self._step(self.net.control_layers[self.next_layer], self.main_input)
            self.next_layer += 1
        return out if hint is None else _added(out, hint)


def _added(out: torch.Tensor, hint: torch.Tensor) -> torch.Tensor:
    """The image tokens (first in the sequence) plus the hint; padding and caption tokens unchanged."""
    n = hint.shape[1]
    return torch.cat([out[:, :n] + hint.to(out.dtype), out[:, n:]], dim=1)


def _streams() -> list[_Stream]:
    return getattr(_steering, "streams", None) or []


def _refiner_input(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
    for stream in _streams():
        stream.start(args[0], args[2], args[3])


def _after_refiner(index: int) -> Callable[..., Any]:
    def hook(module: torch.nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        for stream in _streams():
            out = stream.after_refiner(index, out)
        return out

    return hook


def _main_input(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
    for stream in _streams():
        stream.main_input = args[0][:, : stream.tokens]


def _after_main(index: int) -> Callable[..., Any]:
    def hook(module: torch.nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        for stream in _streams():
            out = stream.after_main(index, out)
        return out

    return hook


def install(transformer: Any) -> None:
    """Hooks on the noise refiner and the main blocks, idle unless a run on this thread is steered.

    Installed once per loaded transformer; each run says on its own thread what steers it, so runs that
    share one loaded model (concurrency 2) are steered only by their own patches."""
    if getattr(transformer, _INSTALLED, False):
        return
    # Eager even inside regionally compiled blocks (the fast path): they read per-thread state.
    eager: Callable[[Any], Any] = torch.compiler.disable
    refiner, layers = transformer.noise_refiner, transformer.layers
    refiner[0].register_forward_pre_hook(eager(_refiner_input))
    for index, block in enumerate(refiner):
        block.register_forward_hook(eager(_after_refiner(index)))
    layers[0].register_forward_pre_hook(eager(_main_input))
    for index, block in enumerate(layers):
        block.register_forward_hook(eager(_after_main(index)))
    setattr(transformer, _INSTALLED, True)


@contextmanager
def steering(
    transformer: Any,
    patches: tuple[ControlPatch, ...],
    latent: torch.Tensor,
    fmt: LatentFormat,
    cancel: Callable[[], bool] | None = None,
) -> Iterator[None]:
    """Within the block, calls of `transformer` on this thread on latents like `latent` are steered."""
    if not patches:
        yield
        return
    height, width = latent.shape[-2:]
    streams = []
    for patch in patches:  # (under smart memory, DiffusionModel.patched holds them on the card for the sampling)
        context = patch.context(height, width, fmt, cancel)
        streams.append(_Stream(patch, context, len(transformer.layers)))
    previous = getattr(_steering, "streams", None)
    _steering.streams = streams
    try:
        yield
    finally:
        _steering.streams = previous
