"""The Z-Image Fun ControlNet Union (alibaba-pai): its variants and loading. The control input it reads is
`engine/control_patch.py`'s; steering a sampling run with it, `engine/control_hooks.py`'s.

A Fun ControlNet is a model patch: a second stream of transformer blocks that reads a control latent
(the VAE encoding of an edge map, a depth map, a pose, ...) and adds a residual ("hint") to the image
tokens of the main model after some of its blocks. It is wired as ComfyUI wires it
(`comfy_extras/nodes_model_patch.py`, `comfy/ldm/lumina/controlnet.py`), so a ComfyUI workflow gives the
same images here:

- the control stream starts from the embedded control latent and attends over image tokens only;
- control layer k takes the main stack's input once (layer 0 adds it through `before_proj`) and feeds
  main block k × round(main blocks / control layers), its hint scaled by the strength;
- 1.0 prepares the control stream with two plain refiner blocks; 2.x steer the main model's noise
  refiner too, with two refiner blocks of their own; a 2.0 file whose refiner projections are all zero
  (a broken release) steers it through the control layers instead, as ComfyUI does for it;
- 2.x read 33 channels: the control latent, a keep-mask (1 = keep) and the latent of the image to
  inpaint with its regenerated region grey.

diffusers' `ZImageControlNetModel` holds the weights (the published files use its key names), and its
blocks do the computing; only the wiring above is ours. diffusers' own pipeline wires it differently
(its control stream also attends over the caption and its hints cover the caption tokens), so its
`forward` is not used.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from zimage_serve.engine import activations
from zimage_serve.engine.cancel import install as install_cancel_checks
from zimage_serve.engine.checkpoint import Checkpoint
from zimage_serve.errors import ModelLoadError, ZImageError

if TYPE_CHECKING:
    from zimage_serve.engine.placement import Placement

log = logging.getLogger(__name__)

LATENT_CHANNELS = 16
PATCH = 2
EMBEDDER = "control_all_x_embedder.2-1"
FOLDER_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")
# How the noise refiner is steered: not at all, 1.0's plain refiner blocks preparing the control stream
# instead; by the patch's own refiner blocks (2.x); or by its control layers (a broken 2.0 file, or a
# diffusers folder saved with add_control_noise_refiner="control_layers").
PLAIN, OWN, CONTROL_LAYERS = "plain", "own", "control_layers"


class ControlNetError(ZImageError):
    """A ControlNet cannot steer this model or these images; the message names what is wrong."""


@dataclass(frozen=True)
class ControlNetVariant:
    """What a Fun ControlNet checkpoint is, told from its keys and shapes."""

    layers: int  # control layers
    in_channels: int  # 16: the control latent; 33: with the inpaint mask and latent
    refiner: str  # PLAIN, OWN or CONTROL_LAYERS
    broken: bool  # its refiner's after_proj weights are all zero (the 2.0 release)
    dim: int
    heads: int
    refiner_layers: int

    @property
    def inpaint(self) -> bool:
        return self.in_channels > LATENT_CHANNELS

    @property
    def version(self) -> str:
        if not self.inpaint and self.refiner == PLAIN and self.layers == 6:
            return "1.0"
        if self.inpaint and self.broken:
            return "2.0"
        if self.inpaint and self.layers == 15:
            return "2.1"
        if self.inpaint and self.layers == 3:
            return "2.1 lite"
        return "custom"

    def describe(self) -> str:
        parts = [f"{self.layers} control layers", f"{self.in_channels} input channels"]
        if self.inpaint:
            parts.append("inpainting")
        if self.broken:
            parts.append(
                "a broken release: its refiner projections (control_noise_refiner.0.after_proj) are all zero, "
                "so its control layers steer the noise refiner instead, as ComfyUI does"
            )
        return f"Fun ControlNet Union {self.version} ({', '.join(parts)})"


def detect_variant(checkpoint: Checkpoint) -> ControlNetVariant:
    """The variant from the checkpoint's keys and shapes (and one small tensor's values), never its size."""
    tensors, origin = checkpoint.tensors, checkpoint.origin
    embedder = tensors.get(f"{EMBEDDER}.weight")
    if embedder is None or len(embedder.shape) != 2:
        raise ModelLoadError(origin, f"not a Z-Image Fun ControlNet: it has no {EMBEDDER}.weight matrix")
    dim, features = embedder.shape
    if features % (PATCH * PATCH):
        raise ModelLoadError(origin, f"{EMBEDDER}.weight has {features} input features, not a multiple of 4")
    in_channels = features // (PATCH * PATCH)
    if in_channels not in (LATENT_CHANNELS, 2 * LATENT_CHANNELS + 1):
        raise ModelLoadError(origin, f"reads {in_channels} channels; Z-Image ControlNets read 16 or 33")
    layers = _count(tensors, "control_layers", origin)
    refiner_layers = _count(tensors, "control_noise_refiner", origin, required=False)
    norm = tensors.get("control_layers.0.attention.norm_q.weight")
    if layers == 0 or norm is None:
        raise ModelLoadError(origin, "has no control layers (control_layers.0.attention.norm_q.weight)")
    head_dim = norm.shape[0]
    if dim % head_dim:
        raise ModelLoadError(origin, f"its width {dim} is not a multiple of its head size {head_dim}")
    broken = False
    if refiner_layers == 0:
        if not in_channels > LATENT_CHANNELS:
            raise ModelLoadError(origin, "a 1.0 ControlNet needs its refiner blocks (control_noise_refiner.*)")
        refiner = CONTROL_LAYERS
    elif "control_noise_refiner.0.before_proj.weight" in tensors:
        projection = "control_noise_refiner.0.after_proj.weight"
        if projection not in tensors:
            raise ModelLoadError(origin, f"its refiner blocks lack {projection}")
        weight = checkpoint.load([projection], torch.device("cpu"), torch.float32)[projection]
        broken = not bool(torch.count_nonzero(weight))
        refiner = CONTROL_LAYERS if broken else OWN
    else:
        refiner = PLAIN
    return ControlNetVariant(layers, in_channels, refiner, broken, dim, dim // head_dim, refiner_layers)


def _count(tensors: dict[str, Any], prefix: str, origin: Path, required: bool = True) -> int:
    """How many blocks `prefix.N.*` there are; they must be numbered 0..n-1."""
    found = {int(key.split(".")[1]) for key in tensors if key.startswith(prefix + ".") and key.split(".")[1].isdigit()}
    if found and found != set(range(len(found))):
        raise ModelLoadError(origin, f"its {prefix} blocks are not numbered 0..{len(found) - 1}: {sorted(found)}")
    return len(found)


@dataclass(frozen=True, eq=False)
class FunControlNet:
    """MODEL_PATCH: a loaded Fun ControlNet."""

    name: str
    module: Any  # diffusers ZImageControlNetModel: the weights and the blocks
    variant: ControlNetVariant

    def check_fits(self, transformer: Any) -> None:
        """The patch was trained for a model of this width and head count."""
        config = transformer.config
        if (int(config.dim), int(config.n_heads)) != (self.variant.dim, self.variant.heads):
            raise ControlNetError(
                f"model_patch: {self.name} is for a model {self.variant.dim} wide with {self.variant.heads} heads; "
                f"this one is {config.dim} wide with {config.n_heads} heads"
            )
        if int(config.in_channels) != LATENT_CHANNELS:
            raise ControlNetError(f"model_patch: {self.name} needs a model with {LATENT_CHANNELS} latent channels")


def controlnet_weights(path: Path) -> tuple[Path, dict[str, Any] | None]:
    """A ControlNet file, or a diffusers `ZImageControlNetModel` folder: its weights and config."""
    if not path.is_dir():
        return path, None
    config_path = path / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelLoadError(path, "a ControlNet folder needs a config.json (diffusers' layout)") from exc
    except (OSError, ValueError) as exc:
        raise ModelLoadError(config_path, f"cannot be read: {exc}") from exc
    if not isinstance(config, dict) or config.get("_class_name") != "ZImageControlNetModel":
        raise ModelLoadError(config_path, "does not describe a ZImageControlNetModel (its _class_name)")
    for name in FOLDER_WEIGHTS:
        if (path / name).is_file():
            return path / name, config
    raise ModelLoadError(path, f"holds no weights ({' or '.join(FOLDER_WEIGHTS)})")


def _agree(config: dict[str, Any], variant: ControlNetVariant, origin: Path) -> None:
    """A folder's config must say what its weights show."""
    said = {
        "control_in_dim": config.get("control_in_dim"),
        "control layers": len(config.get("control_layers_places") or []),
        "dim": config.get("dim", variant.dim),
    }
    shown = {"control_in_dim": variant.in_channels, "control layers": variant.layers, "dim": variant.dim}
    wrong = [f"{key} {said[key]} (the weights have {shown[key]})" for key in said if said[key] != shown[key]]
    if wrong:
        raise ModelLoadError(origin, "config.json disagrees with its weights: " + "; ".join(wrong))


def load_controlnet(name: str, path: Path, placement: Placement) -> FunControlNet:
    from zimage_serve.engine.components import check_keys
    from zimage_serve.engine.construction import building
    from zimage_serve.engine.libraries import load_model_libraries

    # A ControlNet may be a prompt's first model (ModelPatchLoader has no model input): the libraries'
    # first import goes through their one lock (engine/libraries.py).
    load_model_libraries()
    from diffusers import ZImageControlNetModel

    weights, config = controlnet_weights(path)
    checkpoint = Checkpoint.open(weights)
    variant = detect_variant(checkpoint)
    if config is not None:
        _agree(config, variant, path)
    refiner_mode = {PLAIN: None, OWN: "control_noise_refiner"}.get(variant.refiner)
    if variant.refiner == CONTROL_LAYERS and variant.refiner_layers:
        refiner_mode = "control_noise_refiner"  # the broken file still holds them: loaded, not used
    if variant.refiner == CONTROL_LAYERS and not variant.refiner_layers:
        refiner_mode = "control_layers"
    with building(empty=True):
        module = ZImageControlNetModel(
            control_layers_places=list(range(variant.layers)),
            control_refiner_layers_places=list(range(max(variant.refiner_layers, 2))),
            control_in_dim=variant.in_channels,
            add_control_noise_refiner=refiner_mode,
            dim=variant.dim,
            n_refiner_layers=max(variant.refiner_layers, 2),
            n_heads=variant.heads,
            n_kv_heads=variant.heads,
        )
    check_keys(checkpoint.origin, "ControlNet", checkpoint.meta_state_dict(), [], module)
    tensors = checkpoint.load(checkpoint.weight_keys(), placement.load_device, placement.dtype)
    module.load_state_dict({k: v.contiguous() for k, v in tensors.items()}, strict=True, assign=True)
    module.eval().requires_grad_(False)
    install_cancel_checks(module)
    # Under smart memory it shares the card, and is held beside the transformer while it steers.
    placement.place(module, name, activations.controlnet(module.config))
    level = logging.WARNING if variant.broken else logging.INFO
    log.log(level, "loaded %s: %s", name, variant.describe())
    return FunControlNet(name, module, variant)
