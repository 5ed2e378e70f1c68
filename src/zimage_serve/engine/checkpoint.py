"""Reading safetensors files: headers without loading, tensors straight to a device and dtype.

Tensors are memory-mapped by safetensors and materialised one at a time on the target device, so a
bf16 checkpoint never takes an fp32 detour and host RAM peaks near one component, not two.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from zimage_serve.engine import comfy_quant
from zimage_serve.engine.comfy_quant import QuantConf
from zimage_serve.errors import ModelLoadError

_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
_TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_NAMED = 8


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _DTYPE_BYTES.get(self.dtype, 4)

    def meta_tensor(self) -> torch.Tensor:
        """A stand-in with the right shape, for running key converters without touching weights."""
        return torch.empty(self.shape, dtype=_TORCH_DTYPES.get(self.dtype, torch.float32), device="meta")


class Checkpoint:
    """The tensors of one safetensors file or of a sharded set, by key, known from headers only.

    A file in ComfyUI's quantised layout (engine/comfy_quant.py) shows its quantised layers as ordinary
    float weights: their scales and markers are not weights of their own, and `load` dequantises them
    (or, asked to, hands INT8 codes over with their scales)."""

    def __init__(self, tensors: Mapping[str, TensorInfo], origin: Path, quant: Mapping[str, QuantConf] | None = None):
        self.tensors = dict(tensors)
        self.origin = origin
        self.quant = dict(quant or {})
        self._quantised = {f"{layer}.weight": conf for layer, conf in self.quant.items()}  # by the weight's key
        shapes = {key: (info.shape, info.dtype) for key, info in self.tensors.items()}
        for layer, conf in self.quant.items():
            comfy_quant.check_layer(origin, layer, conf, shapes)

    @classmethod
    def open(cls, path: Path) -> Checkpoint:
        """One `.safetensors` file, or a shard index (`*.safetensors.index.json`)."""
        if path.name.endswith(".index.json"):
            return cls._open_index(path)
        tensors, quant = _read_file(path)
        return cls(tensors, path, quant)

    @classmethod
    def _open_index(cls, index_path: Path) -> Checkpoint:
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except FileNotFoundError as exc:
            raise ModelLoadError(index_path, "file not found") from exc
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(index_path, f"not a valid shard index (needs a 'weight_map'): {exc}") from exc
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(index_path, "the shard index has an empty or malformed 'weight_map'")
        tensors: dict[str, TensorInfo] = {}
        quant: dict[str, QuantConf] = {}
        for shard_name in sorted(set(weight_map.values())):
            shard = index_path.parent / str(shard_name)
            header, shard_quant = _read_file(shard)
            quant.update(shard_quant)
            listed = {key for key, name in weight_map.items() if name == shard_name}
            absent = sorted(listed - header.keys())
            if absent:
                raise ModelLoadError(shard, f"the index lists tensors this shard lacks: {name_keys(absent)}")
            tensors.update({key: info for key, info in header.items() if key in listed})
        return cls(tensors, index_path, quant)

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def weight_keys(self) -> list[str]:
        """Every tensor but a quantised layer's scales and marker."""
        quant = self.quant
        return [key for key in self.tensors if not (comfy_quant.is_companion(key) and key.rpartition(".")[0] in quant)]

    def meta_state_dict(self) -> dict[str, torch.Tensor]:
        """Stand-ins for the weights, quantised ones as the float tensors they stand for."""
        state = {}
        for key in self.weight_keys():
            info = self.tensors[key]
            quantised = key in self._quantised
            state[key] = torch.empty(info.shape, device="meta") if quantised else info.meta_tensor()
        return state

    def load(
        self, keys: Iterable[str], device: torch.device, dtype: torch.dtype, keep_int8: bool = False
    ) -> dict[str, torch.Tensor]:
        """Materialise `keys` on `device`; floating tensors are cast to `dtype` there, and quantised weights
        dequantised into it. With `keep_int8`, an INT8 layer's weight stays its codes and its scale comes
        along under `<layer>.weight_scale`."""
        quantised = self._quantised
        keys = list(keys)
        scales = self._read([key + "_scale" for key in keys if key in quantised], device)  # small: read first
        loaded: dict[str, torch.Tensor] = {}

        def converted(key: str, tensor: torch.Tensor) -> torch.Tensor:
            conf = quantised.get(key)
            if conf is None:
                return tensor.to(dtype) if tensor.is_floating_point() and tensor.dtype != dtype else tensor
            scale = scales[key + "_scale"]
            if keep_int8 and conf.int8 and not conf.full_precision:
                loaded[key + "_scale"] = scale
                return tensor
            return comfy_quant.dequantise(conf, tensor, scale, dtype)

        self._read(keys, device, converted, loaded)
        return loaded

    def _read(
        self,
        keys: Iterable[str],
        device: torch.device,
        convert: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
        into: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The tensors, each converted as it is read (so a component's raw and converted copies never
        coexist in memory)."""
        by_file: dict[Path, list[str]] = {}
        for key in dict.fromkeys(keys):
            by_file.setdefault(self.tensors[key].file, []).append(key)
        read: dict[str, torch.Tensor] = {} if into is None else into
        for file, file_keys in by_file.items():
            try:
                with safe_open(str(file), framework="pt", device=_safetensors_device(device)) as handle:
                    for key in file_keys:
                        tensor = handle.get_tensor(key)
                        read[key] = convert(key, tensor) if convert is not None else tensor
            except (SafetensorError, OSError, RuntimeError) as exc:
                raise ModelLoadError(file, f"cannot read tensor data: {exc}") from exc
        return read


def read_header(path: Path) -> dict[str, TensorInfo]:
    return _read_file(path, confs=False)[0]


def _read_file(path: Path, confs: bool = True) -> tuple[dict[str, TensorInfo], dict[str, QuantConf]]:
    """The file's tensors from its header and, with `confs`, its quantised layers' confs (which needs the
    marker tensors' few bytes)."""
    if not path.exists():
        raise ModelLoadError(path, "file not found")
    if not path.is_file():
        raise ModelLoadError(path, "is not a file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {}
            for key in handle.keys():  # noqa: SIM118 - a safetensors handle is not a dict
                view = handle.get_slice(key)
                tensors[key] = TensorInfo(path, tuple(view.get_shape()), view.get_dtype())
            metadata = handle.metadata()
            if not confs or not comfy_quant.has_markers(tensors, metadata):
                return tensors, {}
            markers = {}
            for key, info in tensors.items():
                if key.endswith(comfy_quant.MARKER):
                    comfy_quant.check_marker(path, key, info.shape, info.dtype)  # before a byte of it is read
                    markers[key] = handle.get_tensor(key).numpy().tobytes()
            return tensors, comfy_quant.read_confs(path, markers, metadata)
    except SafetensorError as exc:
        raise ModelLoadError(path, f"not a valid safetensors file (truncated or corrupt?): {exc}") from exc
    except OSError as exc:
        raise ModelLoadError(path, f"cannot be read: {exc}") from exc


def name_keys(keys: Iterable[str]) -> str:
    """A readable, bounded list of tensor names for an error message."""
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_NAMED])
    more = len(keys) - _MAX_NAMED
    return f"{shown} (and {more} more)" if more > 0 else shown


def _safetensors_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else 0}"
    return device.type
