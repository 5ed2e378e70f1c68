"""The engine's fast path on the CPU with a tiny random model: each switch, and the properties the GPU
path relies on (no host sync in the step loop, one network call per step, cached prompts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from zimage_serve.engine import FastPath, GenerationParams, open_engine
from zimage_serve.engine.fastpath import attention_available, best_attention, compiled_blocks, for_smart_memory
from zimage_serve.errors import DeviceError

# Operators that read a device tensor back to the host: on a GPU each one stalls the CPU until the GPU
# has caught up (`.item()`, `float(t)`, `bool(t)`, data-dependent shapes).
HOST_READS = {"_local_scalar_dense", "nonzero", "is_nonzero", "masked_select", "unique", "_unique2", "equal"}


class HostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name in HOST_READS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def test_no_host_reads_inside_the_step_loop(tiny_model: Path) -> None:
    engine = open_engine(tiny_model, device="cpu")
    positive = engine.encode_prompt("a red circle")
    noise = engine.initial_noise([1], 64, 64)
    reads = HostReads()
    steps: list[int] = []
    with reads:
        engine.denoise(noise, positive, steps=8, on_step=lambda info: steps.append(info.step))
    assert steps == list(range(1, 9))
    assert reads.seen == []


def test_the_detector_sees_a_host_read() -> None:
    reads = HostReads()
    with reads:
        float(torch.ones(2).sum())
    assert reads.seen == ["_local_scalar_dense"]


def test_prompt_embeddings_are_cached(tiny_model: Path) -> None:
    engine = open_engine(tiny_model, device="cpu", fast=FastPath(prompt_cache=2))
    calls = [0]
    engine.model.text_encoder.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    first = engine.encode_prompt("a red circle")
    assert engine.encode_prompt("a red circle") is first
    assert calls[0] == 1
    engine.encode_prompt("a blue square")
    engine.encode_prompt("a green triangle")  # evicts the red circle (two entries)
    engine.encode_prompt("a red circle")
    assert calls[0] == 4
    params = GenerationParams("a red circle", width=64, height=64, seed=3, steps=2)
    cached = engine.generate(params).images[0]
    uncached = open_engine(tiny_model, device="cpu", fast=FastPath(prompt_cache=0)).generate(params).images[0]
    assert cached.tobytes() == uncached.tobytes()


def test_cache_off_encodes_every_time(tiny_model: Path) -> None:
    engine = open_engine(tiny_model, device="cpu", fast=FastPath(prompt_cache=0))
    assert engine.encode_prompt("x") is not engine.encode_prompt("x")


def test_cpu_defaults_are_eager_native_attention(tiny_model: Path) -> None:
    engine = open_engine(tiny_model, device="cpu")
    assert engine.fast_path["attention"] == "native"
    assert engine.fast_path["compile"] == "off"
    assert "vae" not in engine.fast_path  # channels-last only on CUDA
    assert engine.describe()["fast_path"] == engine.fast_path


def test_gpu_only_backends_are_unavailable_on_the_cpu() -> None:
    cpu = torch.device("cpu")
    assert best_attention(cpu) == "native"
    for backend in ("_flash_3", "flash", "_native_cudnn", "_native_flash", "no-such-backend"):
        assert not attention_available(backend, cpu)


def test_an_unavailable_backend_is_refused_by_name(tiny_model: Path) -> None:
    with pytest.raises(DeviceError, match="attention: backend 'flash' is not available on cpu"):
        open_engine(tiny_model, device="cpu", fast=FastPath(attention="flash"))


@pytest.mark.parametrize(
    ("settings", "field"),
    [({"attention": "fastest"}, "attention"), ({"compile": "yes"}, "compile"), ({"prompt_cache": -1}, "prompt_cache")],
)
def test_bad_settings_name_the_field(settings: dict[str, Any], field: str) -> None:
    with pytest.raises(DeviceError, match=f"^{field}: "):
        FastPath(**settings)


def test_regional_compile_matches_eager(tiny_model: Path) -> None:
    eager = open_engine(tiny_model, device="cpu", fast=FastPath(compile="off"))
    compiled = open_engine(tiny_model, device="cpu", fast=FastPath(compile="on"))
    assert compiled.fast_path["compile"].startswith("regional")
    transformer = compiled.model.transformer
    blocks = compiled_blocks(transformer)
    assert len(blocks) == len(transformer.noise_refiner) + len(transformer.layers)
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert all(block._compiled_call_impl is None for block in transformer.context_refiner)
    positive = eager.encode_prompt("a red circle")
    noise = eager.initial_noise([5], 64, 64)
    expected = eager.denoise(noise, positive, steps=3)
    got = compiled.denoise(noise, compiled.encode_prompt("a red circle"), steps=3)
    assert torch.linalg.norm(got - expected) / torch.linalg.norm(expected) < 1e-4


def test_smart_memory_turns_automatic_compile_off() -> None:
    assert for_smart_memory(FastPath()).compile == "off"
    assert for_smart_memory(FastPath(compile="on")).compile == "on"  # asked for explicitly: kept
    assert for_smart_memory(FastPath(attention="native")).attention == "native"
