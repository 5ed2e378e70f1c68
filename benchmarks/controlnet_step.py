"""The CPU cost of one sampling step with a Fun ControlNet beside a plain step, measured in one run.

    .venv/bin/python benchmarks/controlnet_step.py [--dim 256] [--size 512] [--rounds 5] [--threads 2]

The transformer has Z-Image's depth (30 main blocks, 2 noise and 2 caption refiners, 128-wide heads) at a
width a CPU can step through (`--dim`; Turbo's is 3840), random weights; the ControlNets have each
variant's layout at that width: 1.0 (6 control layers + 2 plain refiners), 2.1 (15 + 2 of its own) and
2.1 lite (3 + 2). One step = one `parts.sample` Euler step at cfg 1 on a `--size`² image, the control
input already encoded (ComfyUI encodes it once per run, as here). The variants are timed in turn, round
after round, so machine noise hits them alike; the table gives each median and its ratio to the plain step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from zimage_serve.cli.common import quiet_libraries
from zimage_serve.engine.control_hooks import install
from zimage_serve.engine.control_patch import ControlPatch
from zimage_serve.engine.controlnet import FunControlNet, detect_variant
from zimage_serve.engine.parts import FLUX_LATENT, DiffusionModel, sample
from zimage_serve.engine.text import PromptEmbedding
from zimage_serve.nano.random_model import randomise

VARIANTS = {
    "1.0": (6, 16, None),
    "2.1": (15, 33, "control_noise_refiner"),
    "2.1 lite": (3, 33, "control_noise_refiner"),
}


def transformer(dim: int) -> torch.nn.Module:
    from diffusers import ZImageTransformer2DModel

    from zimage_serve.engine import configs

    heads = dim // 128
    model = ZImageTransformer2DModel(
        dim=dim, n_layers=30, n_refiner_layers=2, n_heads=heads, n_kv_heads=heads, cap_feat_dim=dim,
        axes_dims=configs.rope_axes(128),
    )  # fmt: skip
    randomise(model, torch.Generator().manual_seed(0))
    return model.eval().requires_grad_(False)


def controlnet(version: str, dim: int, scratch: str) -> FunControlNet:
    from diffusers import ZImageControlNetModel
    from safetensors.torch import save_file

    from zimage_serve.engine.checkpoint import Checkpoint

    layers, channels, refiner = VARIANTS[version]
    module = ZImageControlNetModel(
        control_layers_places=list(range(layers)), control_refiner_layers_places=[0, 1], control_in_dim=channels,
        add_control_noise_refiner=refiner, dim=dim, n_refiner_layers=2, n_heads=dim // 128, n_kv_heads=dim // 128,
    )  # fmt: skip
    randomise(module, torch.Generator().manual_seed(1))
    path = f"{scratch}/{version.replace(' ', '-')}.safetensors"
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, path)  # its variant, told by keys
    from pathlib import Path

    return FunControlNet(version, module.eval().requires_grad_(False), detect_variant(Checkpoint.open(Path(path))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    quiet_libraries()
    torch.set_num_threads(args.threads)
    import tempfile

    scratch_folder = tempfile.TemporaryDirectory(prefix="zimage-bench-")  # removed with the object, at the end
    scratch = scratch_folder.name
    main_model = transformer(args.dim)
    install(main_model)
    side = args.size // 8
    latent = torch.zeros(1, 16, side, side)
    noise = torch.randn(1, 16, side, side, generator=torch.Generator().manual_seed(2))
    caption = [PromptEmbedding(torch.randn(48, args.dim), 48, 0)]
    models: dict[str, DiffusionModel] = {"plain": DiffusionModel("plain", main_model, FLUX_LATENT)}
    for version in VARIANTS:
        net = controlnet(version, args.dim, scratch)
        patch = ControlPatch(net, None, 0.75, image=torch.zeros(1, args.size, args.size, 3))  # type: ignore[arg-type]
        channels = net.variant.in_channels
        patch._contexts[(side, side)] = torch.randn(1, channels, side, side)  # encoded once per run, as ComfyUI does
        models[version] = models["plain"].with_control(patch)

    def step(model: DiffusionModel) -> float:
        started = time.perf_counter()
        sample(model, noise, latent, caption, [], cfg=1.0, sampler="euler", sigmas=[1.0, 0.5], seed=0)
        return time.perf_counter() - started

    for model in models.values():
        step(model)  # warm-up: allocations, kernels' first calls
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            times[name].append(step(model))
    plain = statistics.median(times["plain"])
    table = Table(
        "step", "median s", "× plain", title=f"one step, dim {args.dim}, {args.size}², {args.threads} threads"
    )
    for name, values in times.items():
        median = statistics.median(values)
        table.add_row(name if name == "plain" else f"+ ControlNet {name}", f"{median:.3f}", f"{median / plain:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
