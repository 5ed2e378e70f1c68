"""Building one component (transformer, text encoder, VAE) from a checkpoint, checked before it loads.

The model is constructed on the meta device from its config, the checkpoint's tensors are renamed and
compared with the model's own (nothing missing, nothing left over, every shape equal), and only then
are the tensors read, straight onto the target device in the target dtype, and assigned in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zimage_serve.engine import configs
from zimage_serve.engine.checkpoint import Checkpoint, name_keys
from zimage_serve.engine.comfy_quant import QuantConf, use_int8_modules
from zimage_serve.engine.construction import building
from zimage_serve.engine.keymap import Kind, is_ldm_vae, root, to_diffusers
from zimage_serve.engine.libraries import load_model_libraries
from zimage_serve.errors import ModelLoadError


@dataclass(frozen=True)
class ComponentSource:
    """Where one component's weights are, and its config when the layout ships one."""

    kind: Kind
    weights: Path  # a .safetensors file or a shard index
    config: dict[str, Any] | None = None  # None: inferred from the tensor shapes

    @property
    def layout(self) -> str:
        return "diffusers" if self.config is not None else "single file"


@dataclass
class PreparedComponent:
    """A component checked against its checkpoint and ready to be read."""

    source: ComponentSource
    checkpoint: Checkpoint
    config: dict[str, Any]
    empty_model: torch.nn.Module  # parameters on the meta device until `load`

    @property
    def nbytes(self) -> int:
        return self.checkpoint.nbytes


def prepare(source: ComponentSource) -> PreparedComponent:
    """Read headers, settle the config and check every key and shape. Reads no tensor data."""
    checkpoint = Checkpoint.open(source.weights)
    meta = checkpoint.meta_state_dict()
    config = source.config
    if config is None:
        config = _infer_config(source.kind, meta, checkpoint.origin)
    conversion = to_diffusers(source.kind, meta, config if source.kind == "vae" else None)
    model = build_empty(source.kind, config, checkpoint.origin)
    check_keys(checkpoint.origin, source.kind, conversion.state, conversion.unused, model)
    return PreparedComponent(source, checkpoint, config, model)


def load(
    prepared: PreparedComponent, device: torch.device, dtype: torch.dtype, int8_matmul: bool = False
) -> torch.nn.Module:
    """Read the tensors onto `device` and fill the prepared model; call once per prepared component.
    Quantised layers are dequantised into `dtype`, except, with `int8_matmul`, INT8 ones, which become
    `Int8Linear` layers over their codes."""
    source, checkpoint = prepared.source, prepared.checkpoint
    tensors = checkpoint.load(checkpoint.weight_keys(), device, dtype, keep_int8=int8_matmul)
    scales = {key: tensors.pop(key) for key in [k for k in tensors if k.endswith(".weight_scale")]}
    state = to_diffusers(source.kind, tensors, prepared.config if source.kind == "vae" else None).state
    model = prepared.empty_model
    if scales:
        _int8_layers(model, state, tensors, scales, checkpoint.quant, checkpoint.origin)
    model.load_state_dict({key: value.contiguous() for key, value in state.items()}, strict=True, assign=True)
    # Parameters are already in place; this moves the buffers built at construction (e.g. RoPE tables).
    model.to(device)
    model.eval().requires_grad_(False)
    return model


def _int8_layers(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    source: dict[str, torch.Tensor],
    scales: dict[str, torch.Tensor],
    quant: dict[str, QuantConf],
    origin_file: Path,
) -> None:
    """Each renamed weight that is INT8 codes makes its layer an `Int8Linear`, with the rows of its
    source layer's scales that it took (the fused qkv is cut into three by rows)."""
    origins = {id(root(tensor)): key for key, tensor in source.items()}
    kept = {}
    for key, codes in list(state.items()):
        if codes.dtype != torch.int8:
            continue
        origin = origins.get(id(root(codes)))
        if origin is None or codes.dim() != 2:
            raise ModelLoadError(origin_file, f"{key}: INT8 codes that the key conversion reshaped; cannot keep them")
        whole = source[origin]
        first = (codes.storage_offset() - whole.storage_offset()) // whole.shape[1]
        rows = scales[origin + "_scale"].float().reshape(-1)
        rows = rows.expand(whole.shape[0]) if rows.numel() == 1 else rows
        name = key.removesuffix(".weight")
        conf = quant[origin.removesuffix(".weight")]
        kept[name] = (codes.contiguous(), rows[first : first + codes.shape[0]].clone(), conf)
        state[f"{name}.scale"] = kept[name][1]
        state[key] = kept[name][0]
    try:
        use_int8_modules(model, kept)
    except (AttributeError, TypeError) as exc:
        raise ModelLoadError(origin_file, f"an INT8 layer is not a linear layer of this model: {exc}") from exc


def build_empty(kind: Kind, config: dict[str, Any], origin: Path) -> torch.nn.Module:
    """The model with parameters on the meta device; buffers stay real so derived tables are kept."""
    # Imported here, not with the module: a worker that has loaded no model yet holds none of them
    # (engine/libraries.py).
    load_model_libraries()
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    try:
        with building(empty=True):
            if kind == "transformer":
                module: torch.nn.Module = ZImageTransformer2DModel.from_config(config)
            elif kind == "text_encoder":
                settings = {k: v for k, v in config.items() if not k.startswith("_")}
                qwen_config = Qwen3Config(**settings)
                qwen_config._attn_implementation = "sdpa"
                module = Qwen3Model(qwen_config)
            else:
                module = AutoencoderKL.from_config(config)
    except (TypeError, ValueError, AssertionError, KeyError) as exc:
        raise ModelLoadError(origin, f"the {kind} config does not describe a buildable model: {exc}") from exc
    return module


def _infer_config(kind: Kind, meta: dict[str, torch.Tensor], origin: Path) -> dict[str, Any]:
    if kind == "vae":
        if not is_ldm_vae(meta):
            raise ModelLoadError(origin, "a single-file VAE must be in the original (ae.safetensors) layout")
        return configs.vae_config(meta, origin)
    renamed = to_diffusers(kind, meta).state
    if kind == "transformer":
        return configs.transformer_config(renamed, origin)
    return configs.text_encoder_config(renamed, origin)


def check_keys(
    origin: Path, kind: str, state: dict[str, torch.Tensor], unused: list[str], model: torch.nn.Module
) -> None:
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    problems = []
    if unused:
        problems.append(f"{len(unused)} tensors that no {kind} weight uses: {name_keys(unused)}")
    unexpected = sorted(state.keys() - expected.keys())
    if unexpected:
        problems.append(f"{len(unexpected)} unknown tensors: {name_keys(unexpected)}")
    missing = sorted(expected.keys() - state.keys())
    if missing:
        problems.append(f"{len(missing)} missing tensors: {name_keys(missing)}")
    wrong = [
        f"{key} is {list(state[key].shape)}, expected {list(shape)}"
        for key, shape in sorted(expected.items())
        if key in state and tuple(state[key].shape) != shape
    ]
    if wrong:
        problems.append(f"{len(wrong)} tensors of the wrong shape: {'; '.join(wrong[:8])}")
    if problems:
        raise ModelLoadError(origin, f"does not match the {kind} it should hold: " + " | ".join(problems))
