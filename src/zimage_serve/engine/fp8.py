"""FP8 (e4m3) weights for the transformer, with a scale per output row.

Three ways to use them, named as ComfyUI's UNETLoader names its weight dtypes:
- `fp8_e4m3fn` (and `fp8_e5m2`, more range, less precision): weights stored in FP8 and widened to the
  activations' dtype for each matmul. Half the memory of bf16; the arithmetic stays bf16.
- `fp8_e4m3fn_fast`: FP8 × FP8 matmuls (`torch._scaled_mm`, the H100's FP8 tensor cores) with the
  activations quantised on the fly, one scale per row (token), and the weights' scale per output row.

Only the attention and feed-forward projections of the main blocks are quantised. The layers that
published FP8 runs of Z-Image found sensitive stay bf16: the adaLN modulation, the embedders, the
refiners and the final layer (vLLM-Omni PR #2795: all-layer FP8 gave noise, LPIPS 0.74; with these
kept in bf16, 0.07). `keep_last` keeps the last main blocks in bf16 too, for a stricter quality gate
(vLLM-Omni PR #3929 kept 15).
"""

from __future__ import annotations

import re
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from zimage_serve.engine.names import WEIGHT_DTYPES
from zimage_serve.errors import DeviceError

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)
WeightDtype = Literal["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]
STORAGE = {"fp8_e4m3fn": FP8, "fp8_e4m3fn_fast": FP8, "fp8_e5m2": torch.float8_e5m2}
QUANTISED_PARTS = ("attention.", "feed_forward.")
TEXT_QUANTISED_PARTS = ("self_attn.", "mlp.")  # Qwen3's
# The same projections by checkpoint name, in diffusers' and ComfyUI's spellings (prefix or not).
QUANTISED_NAME = re.compile(r"(^|\.)layers\.\d+\.(attention|feed_forward)\.[^.]+(\.0)?\.weight$")


def quantise_rows(weight: torch.Tensor, dtype: torch.dtype = FP8) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 weight, fp32 scale per row) with weight ≈ fp8.float() * scale[:, None]."""
    largest = float(torch.finfo(dtype).max)
    amax = weight.detach().abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / largest
    quantised = (weight.detach().float() / scale).clamp(-largest, largest).to(dtype)
    return quantised, scale.squeeze(1)


class Fp8Linear(nn.Module):
    """`nn.Linear` with FP8 weights; see the module's docstring for the two modes."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, fast: bool) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.fast = fast
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fast: bool, dtype: torch.dtype = FP8) -> Fp8Linear:
        if fast and dtype != FP8:
            raise ValueError("FP8 matmuls take e4m3 weights")
        weight, scale = quantise_rows(linear.weight, dtype)
        return cls(weight, scale, linear.bias, fast)

    def dequantised(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.to(torch.float32) * self.scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if not self.fast:
            out = F.linear(rows, self.dequantised(x.dtype), self.bias)
        else:
            amax = rows.detach().abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
            row_scale = amax / FP8_MAX
            quantised = (rows.float() / row_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            out = torch._scaled_mm(
                quantised,
                self.weight.t(),  # column-major, as the FP8 GEMM wants its second operand
                scale_a=row_scale,
                scale_b=self.scale[None, :].float(),
                bias=bias,
                out_dtype=x.dtype,
            )
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        mode = "fp8 x fp8" if self.fast else "fp8 weights"
        return f"in_features={self.in_features}, out_features={self.out_features}, {mode}"


def check_weight_dtype(weight_dtype: str) -> WeightDtype:
    if weight_dtype not in WEIGHT_DTYPES:
        raise DeviceError(f"weight_dtype: {weight_dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    return weight_dtype  # type: ignore[return-value]


def quantise_transformer(transformer: Any, weight_dtype: str, keep_last: int = 0) -> int:
    """Replace the main blocks' attention and feed-forward projections in place; returns how many."""
    blocks = list(transformer.layers)
    return _quantise(blocks[: max(0, len(blocks) - keep_last)], QUANTISED_PARTS, weight_dtype)


def quantise_text_encoder(text_encoder: Any, weight_dtype: str) -> int:
    """The same for Qwen3's layers (attention and MLP projections; embeddings and norms stay): half the
    memory, and on an H100 with `fp8_e4m3fn_fast` FP8 matmuls. Returns how many projections."""
    return _quantise(list(text_encoder.layers), TEXT_QUANTISED_PARTS, weight_dtype)


def _quantise(blocks: list[nn.Module], parts: tuple[str, ...], weight_dtype: str) -> int:
    if check_weight_dtype(weight_dtype) == "default":
        return 0
    fast = weight_dtype == "fp8_e4m3fn_fast"
    storage = STORAGE[weight_dtype]
    replaced = 0
    for block in blocks:
        for name, module in list(block.named_modules()):
            if isinstance(module, nn.Linear) and name.startswith(parts):
                parent_name, _, child = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                setattr(parent, child, Fp8Linear.from_linear(module, fast, storage))
                replaced += 1
    return replaced


def fp8_bytes_saved(numels: dict[str, int], weight_dtype: str, element_size: int) -> int:
    """Bytes that quantising would save, from the transformer checkpoint's (name → numel) table."""
    if weight_dtype == "default":
        return 0
    quantised = sum(numel for name, numel in numels.items() if QUANTISED_NAME.search(name))
    return quantised * (element_size - 1)


def quantised_layers(transformer: Any) -> int:
    return sum(isinstance(m, Fp8Linear) for m in transformer.modules())
