"""ComfyUI's quantised weight files: INT8 ConvRot and FP8 layers beside high-precision ones.

A file says which of its layers are quantised, and how, per layer: a `<layer>.comfy_quant` tensor (uint8
bytes of a JSON object) and/or the header's `_quantization_metadata` (which wins where both name a layer).
Nothing is read from the file's name. Two formats occur in the official Z-Image files:

- `int8_tensorwise` with `convrot`: int8 codes of the weight rotated group-wise by a regular Hadamard matrix
  (`convrot_groupsize` columns a group), one float32 scale per output row. Because the rotation is
  orthogonal and symmetric, the same multiplication rotates and un-rotates.
- `float8_e4m3fn` / `float8_e5m2`: FP8 codes and one float32 scale for the tensor (the mixed text encoder).

Every other tensor of such a file is an ordinary one. A quantised layer is either dequantised once at load
(exact: codes times scales, un-rotated in float32, then cast to the compute dtype) or, for INT8, kept as
codes in an `Int8Linear` that multiplies in INT8 (W8A8, as ComfyUI does on a GPU).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zimage_serve.errors import ModelLoadError

MARKER = ".comfy_quant"
COMPANIONS = (".weight_scale", ".input_scale", MARKER)
HEADER_KEY = "_quantization_metadata"
INT8 = "int8_tensorwise"
FP8_FORMATS = {"float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
FORMATS = (INT8, *FP8_FORMATS)
INT8_MAX = 127
MAX_MARKER_BYTES = 64 * 1024  # a conf is a short JSON object; anything bigger is not one
MAX_GROUP = 4096
_REGULAR_4 = ((1, 1, 1, -1), (1, 1, -1, 1), (1, -1, 1, 1), (-1, 1, 1, 1))
_CPU = torch.device("cpu")
# cuBLASLt's int8 GEMM behind torch._int_mm wants more than 16 rows and widths in multiples of 8.
_CUDA_MIN_ROWS = 17


@dataclass(frozen=True)
class QuantConf:
    """How one layer's weight is stored."""

    format: str
    convrot: bool = False
    group_size: int = 256
    full_precision: bool = False  # ComfyUI's full_precision_matrix_mult: compute in the compute dtype

    @property
    def int8(self) -> bool:
        return self.format == INT8


def is_companion(key: str) -> bool:
    """A tensor that belongs to a quantised weight rather than being a weight of its own."""
    return key.endswith(COMPANIONS)


def has_markers(keys: Iterable[str], metadata: Mapping[str, str] | None) -> bool:
    return bool(metadata and HEADER_KEY in metadata) or any(key.endswith(MARKER) for key in keys)


def check_marker(origin: Path, key: str, shape: tuple[int, ...], dtype: str) -> None:
    """A marker is a short 1-D uint8 tensor: checked from the header, before it is read."""
    if dtype != "U8" or len(shape) != 1 or shape[0] > MAX_MARKER_BYTES:
        limit = f"a quantisation marker is 1-D uint8 of at most {MAX_MARKER_BYTES} bytes"
        raise ModelLoadError(origin, f"{key} is {dtype} {list(shape)}; {limit}")


def parse_conf(raw: Any, layer: str, origin: Path) -> QuantConf:
    """A layer's conf (the decoded JSON object), checked; ComfyUI also nests convrot under `params`."""
    if not isinstance(raw, dict):
        raise ModelLoadError(origin, f"{layer}: the quantisation conf is not a JSON object")
    fmt = raw.get("format")
    if fmt not in FORMATS:
        raise ModelLoadError(
            origin, f"{layer}: quantisation format {fmt!r} is not supported (supported: {', '.join(FORMATS)})"
        )
    nested = raw.get("params")
    params: dict[str, Any] = nested if isinstance(nested, dict) else {}
    convrot = raw.get("convrot", params.get("convrot", False))
    group = raw.get("convrot_groupsize", params.get("convrot_groupsize", 256))
    full = raw.get("full_precision_matrix_mult", False)
    if not isinstance(convrot, bool) or not isinstance(full, bool):
        raise ModelLoadError(origin, f"{layer}: convrot and full_precision_matrix_mult must be true or false")
    if convrot and (fmt != INT8 or not _power_of_four(group) or group > MAX_GROUP):
        raise ModelLoadError(
            origin,
            f"{layer}: convrot needs format {INT8} and a group size that is a power of 4 up to {MAX_GROUP}, "
            f"got {group!r}",
        )
    return QuantConf(fmt, convrot, group if convrot else 256, full)


def _power_of_four(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int) or value < 4:
        return False
    return value & (value - 1) == 0 and (value.bit_length() - 1) % 2 == 0


def read_confs(
    origin: Path, marker_bytes: Mapping[str, bytes], metadata: Mapping[str, str] | None
) -> dict[str, QuantConf]:
    """Each quantised layer's conf, from its marker tensors' bytes and the header's metadata."""
    raw: dict[str, Any] = {}
    for key, data in marker_bytes.items():
        layer = key.removesuffix(MARKER)
        try:
            raw[layer] = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ModelLoadError(origin, f"{key} is not a JSON quantisation conf: {exc}") from exc
    if metadata and HEADER_KEY in metadata:
        try:
            layers = json.loads(metadata[HEADER_KEY]).get("layers", {})
        except (ValueError, AttributeError, RecursionError) as exc:
            raise ModelLoadError(origin, f"the header's {HEADER_KEY} is not a JSON object with 'layers'") from exc
        if not isinstance(layers, dict):
            raise ModelLoadError(origin, f"the header's {HEADER_KEY} 'layers' is not an object")
        raw.update(layers)
    return {layer: parse_conf(conf, layer, origin) for layer, conf in raw.items()}


def check_layer(origin: Path, layer: str, conf: QuantConf, shapes: Mapping[str, tuple[tuple[int, ...], str]]) -> None:
    """The layer's tensors are there, in the dtypes and shapes its conf implies."""
    weight, scale = shapes.get(f"{layer}.weight"), shapes.get(f"{layer}.weight_scale")
    if weight is None or scale is None:
        raise ModelLoadError(origin, f"{layer} is marked quantised but lacks its weight or weight_scale")
    (shape, dtype), (scale_shape, _) = weight, scale
    wanted = "I8" if conf.int8 else FP8_FORMATS[conf.format]
    if dtype != wanted or len(shape) != 2 or 0 in shape:
        raise ModelLoadError(origin, f"{layer}.weight is {dtype} {list(shape)}; {conf.format} needs a 2-D {wanted}")
    rows = math.prod(scale_shape)
    if rows not in (1, shape[0]):
        raise ModelLoadError(origin, f"{layer}.weight_scale has {rows} values for {shape[0]} rows")
    if conf.convrot and shape[1] % conf.group_size:
        raise ModelLoadError(origin, f"{layer}: {shape[1]} input columns do not divide in groups of {conf.group_size}")


@functools.cache
def regular_hadamard(group_size: int, device: torch.device = _CPU) -> torch.Tensor:
    """H_G: the Kronecker power of the 4×4 regular Hadamard matrix over √G (symmetric, H·H = I); one
    copy per device, so a forward pass never copies it to the card."""
    matrix = torch.ones(1, 1, dtype=torch.float64)
    block = torch.tensor(_REGULAR_4, dtype=torch.float64)
    while matrix.shape[0] < group_size:
        matrix = torch.kron(matrix, block)
    return (matrix / math.sqrt(group_size)).to(device, torch.float32)


def rotate_groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each consecutive group of `group_size` values on the last dimension times H_G (float32)."""
    shape = x.shape
    grouped = x.float().reshape(*shape[:-1], shape[-1] // group_size, group_size)
    return (grouped @ regular_hadamard(group_size, x.device)).reshape(shape)


def scales_per_row(scale: torch.Tensor, rows: int) -> torch.Tensor:
    return scale.float().reshape(-1).expand(rows) if scale.numel() == 1 else scale.float().reshape(rows)


def dequantise(conf: QuantConf, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The layer's weight in `dtype`: codes times their scale, un-rotated, all in float32 first."""
    weight = codes.float() * scales_per_row(scale, codes.shape[0])[:, None]
    if conf.convrot:
        weight = rotate_groups(weight, conf.group_size)
    return weight.to(dtype)


def quantise_int8(weight: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, float32 scale per row) of a weight, rotated first when `group_size` is given; the
    inverse of `dequantise` up to rounding (half to even, as the published files were made)."""
    rotated = rotate_groups(weight, group_size) if group_size else weight.float()
    scale = (rotated.abs().amax(dim=1) / INT8_MAX).clamp(min=1e-30)
    codes = torch.round(rotated / scale[:, None]).clamp(-INT8_MAX - 1, INT8_MAX).to(torch.int8)
    return codes, scale


class Int8Linear(nn.Module):
    """`nn.Linear` over INT8 codes: activations rotated like the weight and quantised per row (token) to
    int8, an int8 × int8 → int32 matmul (`torch._int_mm`), then both scales. This is ComfyUI's W8A8."""

    weight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, conf: QuantConf) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.conf = conf
        # Buffers, not parameters: int8 cannot require gradients, and the model's dtype is its float one.
        self.register_buffer("weight", codes)
        self.register_buffer("scale", scales_per_row(scale, codes.shape[0]).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach())

    def dequantised(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantise(self.conf, self.weight, self.scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.conf.full_precision:
            return F.linear(x, self.dequantised(x.dtype), bias)
        if rows.is_cuda and (self.in_features % 8 or self.out_features % 8):
            return F.linear(x, self.dequantised(x.dtype), bias)
        count = rows.shape[0]
        if rows.is_cuda and count < _CUDA_MIN_ROWS:  # zero rows quantise to zero codes; cut off below
            rows = F.pad(rows, (0, 0, 0, _CUDA_MIN_ROWS - count))
        rotated = rotate_groups(rows, self.conf.group_size) if self.conf.convrot else rows.float()
        row_scale = (rotated.abs().amax(dim=1, keepdim=True) / INT8_MAX).clamp(min=1e-30)
        codes = torch.round(rotated / row_scale).clamp(-INT8_MAX - 1, INT8_MAX).to(torch.int8)
        product = torch._int_mm(codes, self.weight.t()).float() * row_scale * self.scale[None, :]
        out = product[:count].to(x.dtype)
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        rotation = f", convrot groups of {self.conf.group_size}" if self.conf.convrot else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 x int8{rotation}"


def use_int8_modules(model: nn.Module, kept: Mapping[str, tuple[torch.Tensor, torch.Tensor, QuantConf]]) -> int:
    """Put an `Int8Linear` in place of each named linear layer (codes, scale, conf); how many."""
    for name, (codes, scale, conf) in kept.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is not a linear layer")
        setattr(parent, child, Int8Linear(codes, scale, linear.bias, conf))
    return len(kept)
