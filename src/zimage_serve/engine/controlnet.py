"""The Z-Image Fun ControlNet Union (alibaba-pai): its variants, loading, and steering a sampling run.

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
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from zimage_serve.engine.cancel import install as install_cancel_checks
from zimage_serve.engine.checkpoint import Checkpoint
from zimage_serve.engine.names import LATENT_FACTOR
from zimage_serve.engine.resize import common_upscale, repeat_to_batch
from zimage_serve.errors import ModelLoadError, ZImageError

if TYPE_CHECKING:
    from zimage_serve.engine.offload import ModelSwap
    from zimage_serve.engine.parts import LatentFormat, Placing, Vae

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
    swap: ModelSwap | None = field(default=None, repr=False)  # model offload: rides along with the transformer

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


def load_controlnet(name: str, path: Path, placing: Placing) -> FunControlNet:
    from diffusers import ZImageControlNetModel

    from zimage_serve.engine.components import check_keys
    from zimage_serve.engine.construction import building
    from zimage_serve.engine.devices import MemoryMode

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
    tensors = checkpoint.load(checkpoint.tensors.keys(), placing.load_device, placing.dtype)
    module.load_state_dict({k: v.contiguous() for k, v in tensors.items()}, strict=True, assign=True)
    module.eval().requires_grad_(False)
    install_cancel_checks(module)
    swap = placing.swap if placing.memory_mode is MemoryMode.MODEL else None
    if swap is None:
        placing.place(module)
    level = logging.WARNING if variant.broken else logging.INFO
    log.log(level, "loaded %s: %s", name, variant.describe())
    return FunControlNet(name, module, variant, swap)


# -- the control input -------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ControlPatch:
    """One ControlNet applied to a MODEL: its images, the VAE that encodes them, and the strength.

    `mask` follows ComfyUI's nodes (1 = regenerate) and is inverted here, as ComfyUI's node does."""

    controlnet: FunControlNet
    vae: Vae
    strength: float
    image: torch.Tensor | None = None  # IMAGE (batch, H, W, C): the control map
    inpaint_image: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # MASK (batch, H, W)
    _contexts: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.image is None and self.inpaint_image is None:
            raise ControlNetError("image: a ControlNet needs a control image, an inpaint_image, or both")

    def context(self, height: int, width: int, fmt: LatentFormat, cancel: Callable[[], bool] | None) -> torch.Tensor:
        """The control input (batch, channels, height, width) for a latent of this size, encoded once."""
        with self._lock:
            found = self._contexts.get((height, width))
            if found is None:
                found = self._encode(height, width, fmt, cancel)
                self._contexts.clear()  # one size at a time: a run samples at one size
                self._contexts[(height, width)] = found
            return found

    def _encode(self, height: int, width: int, fmt: LatentFormat, cancel: Callable[[], bool] | None) -> torch.Tensor:
        size = (width * LATENT_FACTOR, height * LATENT_FACTOR)

        def fitted(image: torch.Tensor) -> torch.Tensor:  # ComfyUI scales with "area" and a centre crop
            image = image[..., :3].float()
            if (image.shape[2], image.shape[1]) != size:
                image = common_upscale(image.movedim(-1, 1), *size, "area", "center").movedim(1, -1)
            return image

        def encoded(image: torch.Tensor) -> torch.Tensor:
            return fmt.process_in(self.vae.encode(image, cancel))

        control = fitted(self.image) if self.image is not None else None
        inpaint = fitted(self.inpaint_image) if self.inpaint_image is not None else None
        control_latent = encoded(control) if control is not None else None
        if not self.controlnet.variant.inpaint:
            assert control_latent is not None  # an inpaint image alone only reaches an inpainting patch
            return control_latent
        grey = torch.full((1, size[1], size[0], 3), 0.5)
        keep = None if self.mask is None else 1.0 - self.mask.float().reshape(-1, 1, *self.mask.shape[-2:])
        if inpaint is None:
            inpaint = grey if control is None else torch.full_like(control, 0.5)
        if keep is not None:
            keep_pixels = common_upscale(keep, size[0], size[1], "bilinear", "center").movedim(1, -1).round()
            inpaint = (inpaint - 0.5) * keep_pixels + 0.5
        inpaint_latent = encoded(inpaint)
        if keep is None:
            keep_latent = torch.zeros_like(inpaint_latent[:, :1])
        else:
            keep_latent = common_upscale(keep, width, height, "nearest", "center")
        if control_latent is None:
            control_latent = encoded(grey)
        batch = max(control_latent.shape[0], keep_latent.shape[0], inpaint_latent.shape[0])
        parts = [repeat_to_batch(t, batch) for t in (control_latent, keep_latent, inpaint_latent)]
        return torch.cat(parts, dim=1)


# -- steering the transformer -------------------------------------------------------------------------

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
    for patch in patches:
        if patch.controlnet.swap is not None:
            patch.controlnet.swap.accompany(patch.controlnet.module)
        context = patch.context(height, width, fmt, cancel)
        streams.append(_Stream(patch, context, len(transformer.layers)))
    previous = getattr(_steering, "streams", None)
    _steering.streams = streams
    try:
        yield
    finally:
        _steering.streams = previous
