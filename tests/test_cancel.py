"""Interrupts act inside one model call: every block of a loaded model checks first."""

from __future__ import annotations

import pytest
import torch

from zimage_serve.engine.cancel import cancellable, install
from zimage_serve.errors import GenerationCancelled
from zimage_serve.nano.default import default_model
from zimage_serve.workflow.folders import Folders, builtin_models
from zimage_serve.workflow.nodes.loading import load_model_file


class Blocks(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_call_stops_at_the_next_block_and_only_on_its_own_thread() -> None:
    model = install(Blocks())
    ran: list[int] = []
    for index, layer in enumerate(model.layers):
        layer.register_forward_hook(lambda *_, i=index: ran.append(i))
    with cancellable(lambda: len(ran) >= 2), pytest.raises(GenerationCancelled):
        model(torch.zeros(1, 4))
    assert ran == [0, 1]
    ran.clear()
    model(torch.zeros(1, 4))  # outside the block no check applies
    assert ran == list(range(6))
    assert install(model) is model  # installed once


def test_the_nano_transformer_stops_inside_its_call(tmp_path: object) -> None:
    from dataclasses import replace

    from zimage_serve.engine.parts import Placing
    from zimage_serve.workflow.context import NodeContext

    assert default_model().is_dir()
    ctx = NodeContext(Folders(builtin=builtin_models()), Placing.choose("cpu"), "1")
    model = load_model_file(replace(ctx), "diffusion_models", "zimage-nano")
    blocks = [m for m in model.transformer.modules() if isinstance(m, torch.nn.ModuleList) for m in m]
    ran: list[int] = []
    handles = [block.register_forward_hook(lambda *_: ran.append(1)) for block in blocks]
    latent = torch.zeros(1, model.latent_channels, 16, 16)
    caption = torch.zeros(4, model.transformer.config.cap_feat_dim)
    with cancellable(lambda: len(ran) >= 3), pytest.raises(GenerationCancelled):
        model.velocity(latent, 0.5, [caption])
    assert len(ran) == 3 < len(blocks)
    for handle in handles:
        handle.remove()
