"""FP8 weights on the CPU (torch's reference FP8 GEMM): numerics, which layers, and a whole tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from zimage_serve.engine import open_engine
from zimage_serve.engine.fp8 import (
    FP8,
    Fp8Linear,
    fp8_bytes_saved,
    quantise_rows,
    quantise_text_encoder,
    quantise_transformer,
    quantised_layers,
)
from zimage_serve.errors import DeviceError


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.detach().float(), expected.detach().float()
    return float(torch.linalg.norm(got - expected) / torch.linalg.norm(expected))


def test_rows_keep_their_own_scale() -> None:
    weight = torch.randn(64, 96) * torch.logspace(-3, 3, 64)[:, None]  # rows six decades apart
    quantised, scale = quantise_rows(weight)
    assert quantised.dtype == FP8 and scale.shape == (64,)
    restored = quantised.float() * scale[:, None]
    per_row = torch.linalg.norm(restored - weight, dim=1) / torch.linalg.norm(weight, dim=1)
    assert per_row.max() < 0.04  # e4m3: 3 mantissa bits; a shared scale would flush the small rows to 0


@pytest.mark.parametrize("fast", [False, True])
def test_fp8_linear_approximates_the_linear(fast: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(128, 64)
    x = torch.randn(3, 10, 128) * torch.logspace(-2, 2, 10)[None, :, None]  # tokens of very different sizes
    quantised = Fp8Linear.from_linear(linear, fast=fast)
    got = quantised(x)
    assert got.shape == (3, 10, 64)
    assert relative_error(got, linear(x)) < 0.05
    assert quantised.weight.dtype == FP8 and quantised.weight.element_size() == 1


def test_fast_and_weight_only_agree_closely() -> None:
    torch.manual_seed(1)
    linear = nn.Linear(64, 32, bias=False)
    x = torch.randn(20, 64)
    slow, fast = Fp8Linear.from_linear(linear, fast=False), Fp8Linear.from_linear(linear, fast=True)
    assert relative_error(fast(x), slow(x)) < 0.05  # the difference is the activations' quantisation


def test_only_main_block_projections_are_quantised(tiny_model: Path) -> None:
    engine = open_engine(tiny_model, device="cpu")
    transformer = engine.model.transformer
    per_block = 7  # to_q, to_k, to_v, to_out.0, w1, w2, w3
    count = quantise_transformer(transformer, "fp8_e4m3fn_fast", keep_last=1)
    assert count == per_block * (len(transformer.layers) - 1) == quantised_layers(transformer)
    for name, module in transformer.named_modules():
        if isinstance(module, Fp8Linear):
            assert name.startswith("layers.") and ("attention" in name or "feed_forward" in name)
            assert not name.startswith(f"layers.{len(transformer.layers) - 1}.")
    assert not any(isinstance(m, Fp8Linear) for m in transformer.noise_refiner.modules())
    assert isinstance(transformer.layers[0].adaLN_modulation[0], nn.Linear)


@pytest.mark.parametrize("weight_dtype", ["fp8_e4m3fn", "fp8_e4m3fn_fast"])
def test_a_quantised_model_stays_close_to_its_original(tiny_model: Path, weight_dtype: str) -> None:
    reference = open_engine(tiny_model, device="cpu")
    quantised = open_engine(tiny_model, device="cpu", weight_dtype=weight_dtype)
    assert quantised_layers(quantised.model.transformer) > 0
    assert quantised.describe()["weight_dtype"] == weight_dtype
    noise = reference.initial_noise([3], 64, 64)
    expected = reference.denoise(noise, reference.encode_prompt("a red circle"), steps=4)
    got = quantised.denoise(noise, quantised.encode_prompt("a red circle"), steps=4)
    assert torch.isfinite(got).all()
    assert 0 < relative_error(got, expected) < 0.1


def test_quantised_weights_take_half_the_memory(tiny_model: Path) -> None:
    engine = open_engine(tiny_model, device="cpu", dtype="bf16")
    transformer = engine.model.transformer

    def layer_bytes() -> int:
        return sum(p.numel() * p.element_size() for p in transformer.layers.parameters())

    before = layer_bytes()
    quantise_transformer(transformer, "fp8_e4m3fn")
    assert layer_bytes() < 0.65 * before


def test_memory_estimate_counts_the_projections_in_both_spellings() -> None:
    names = {
        "layers.0.attention.to_q.weight": 100,
        "layers.0.attention.to_out.0.weight": 100,
        "model.diffusion_model.layers.1.attention.qkv.weight": 300,  # ComfyUI's fused spelling
        "layers.1.feed_forward.w2.weight": 200,
        "layers.0.adaLN_modulation.0.weight": 1000,  # kept in bf16
        "noise_refiner.0.attention.to_q.weight": 1000,  # kept in bf16
    }
    assert fp8_bytes_saved(names, "fp8_e4m3fn_fast", element_size=2) == 700
    assert fp8_bytes_saved(names, "default", element_size=2) == 0


def test_unknown_weight_dtype_is_named(tiny_model: Path) -> None:
    with pytest.raises(DeviceError, match=r"^weight_dtype: 'int4' is not one of"):
        open_engine(tiny_model, device="cpu", weight_dtype="int4")


@pytest.mark.parametrize(("weight_dtype", "bound"), [("fp8_e4m3fn", 0.1), ("fp8_e4m3fn_fast", 0.2)])
def test_a_quantised_text_encoder_gives_close_embeddings(tiny_model: Path, weight_dtype: str, bound: float) -> None:
    """(`_fast` quantises the activations too: random weights through every layer drift a little more.)"""
    reference = open_engine(tiny_model, device="cpu")
    quantised = open_engine(tiny_model, device="cpu")
    encoder = quantised.model.text_encoder
    per_layer = 7  # q, k, v, o; gate, up, down
    assert quantise_text_encoder(encoder, weight_dtype) == per_layer * len(encoder.layers)
    assert quantise_text_encoder(encoder, "default") == 0
    assert all(name.startswith("layers.") for name, m in encoder.named_modules() if isinstance(m, Fp8Linear))
    assert isinstance(encoder.embed_tokens, nn.Embedding)
    expected = reference.encode_prompt("a red circle on a blue square").embeds
    got = quantised.encode_prompt("a red circle on a blue square").embeds
    assert torch.isfinite(got).all() and 0 < relative_error(got, expected) < bound
