"""Upscale models through spandrel: tiny files in the published ESRGAN and Real-ESRGAN Compact layouts,
ComfyUI's tiling, and the bad files a loader must refuse."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from tests.workflows import run
from zimage_serve.engine.placement import Placement
from zimage_serve.engine.upscale import load_upscale_model, tiled_scale
from zimage_serve.errors import ModelLoadError
from zimage_serve.nano.random_model import randomise
from zimage_serve.workflow.execute import Executor
from zimage_serve.workflow.folders import Folders
from zimage_serve.workflow.nodes import NODES


def esrgan_state(scale: int) -> dict[str, torch.Tensor]:
    """The original ESRGAN release's keys (model.0, model.1.sub.N.RDBk.convj.0, ...), eight filters wide."""
    from spandrel.architectures.ESRGAN import ESRGAN

    net = ESRGAN(num_filters=8, num_blocks=1, scale=scale)
    randomise(net, torch.Generator().manual_seed(scale))
    return {k: v.contiguous() for k, v in net.state_dict().items()}


def compact_state() -> dict[str, torch.Tensor]:
    """Real-ESRGAN's SRVGGNetCompact (realesr-general-x4v3's layout: body.N.*), two convolutions deep."""
    from spandrel.architectures.Compact import Compact

    net = Compact(num_feat=8, num_conv=2, upscale=2)
    randomise(net, torch.Generator().manual_seed(7))
    return {k: v.contiguous() for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("upscale") / "models"
    folder = root / "upscale_models"
    folder.mkdir(parents=True)
    save_file(esrgan_state(4), str(folder / "4x-esrgan.safetensors"))
    torch.save(esrgan_state(2), folder / "2x-esrgan.pth")
    torch.save({"params_ema": compact_state()}, folder / "2x-compact.pth")  # BasicSR's wrapper
    return root


@pytest.fixture
def executor(models: Path, tmp_path: Path) -> Executor:
    return Executor(NODES, Folders.default(tmp_path, [models]), Placement.choose("cpu"))


@pytest.mark.parametrize(("name", "architecture", "scale"), [
    ("4x-esrgan.safetensors", "ESRGAN", 4), ("2x-esrgan.pth", "ESRGAN", 2), ("2x-compact.pth", "RealESRGAN Compact", 2)
])  # fmt: skip
def test_published_layouts_load_with_their_scale(models: Path, name: str, architecture: str, scale: int) -> None:
    model = load_upscale_model(models / "upscale_models" / name)
    assert model.scale == scale and architecture in model.architecture.name


def graph(model: str, size: int) -> dict[str, Any]:
    return {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": size, "height": size // 2, "batch_size": 1, "color": 0x336699}},
        "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 1, "sigma": 1.0}},
        "3": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": model}},
        "4": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["3", 0], "image": ["2", 0]}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }  # fmt: skip


def test_the_nodes_upscale_as_the_model_does_in_one_tile(executor: Executor, models: Path) -> None:
    assert set(executor.folders.names("upscale_models")) == {"4x-esrgan.safetensors", "2x-esrgan.pth", "2x-compact.pth"}
    result = run(executor, graph("4x-esrgan.safetensors", 32))
    assert result.ok, result.error
    [entry] = result.outputs["5"]["images"]
    from PIL import Image

    saved = Image.open(executor.folders.temp / entry["subfolder"] / entry["filename"])
    assert saved.size == (128, 64)
    model = load_upscale_model(models / "upscale_models" / "4x-esrgan.safetensors")
    image = torch.full((1, 3, 16, 32), 0.5)
    with torch.inference_mode():
        direct = model(image).clamp(0, 1)
    assert torch.allclose(tiled_scale(image, model, 4).clamp(0, 1), direct, atol=1e-6)


def test_tiles_overlap_and_blend_close_to_one_pass(models: Path) -> None:
    model = load_upscale_model(models / "upscale_models" / "2x-compact.pth")
    image = torch.rand(1, 3, 40, 72, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        direct = model(image)
        tiled = tiled_scale(image, model, 2, tile=24, overlap=8)
    assert tiled.shape == direct.shape == (1, 3, 80, 144)
    # Away from the tiles' own borders each tile sees what the whole pass sees: the blend matches there.
    assert (tiled - direct).abs().mean() < 0.02


def test_bad_files_are_refused_with_their_name(tmp_path: Path) -> None:
    save_file({"weight": torch.zeros(3, 3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelLoadError, match=r"other\.safetensors.*not an upscale model"):
        load_upscale_model(tmp_path / "other.safetensors")

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (print, ("this must never run",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"model.0.weight": Payload()}, protocol=2))
    with pytest.raises(ModelLoadError, match="cannot be read as plain tensors"):
        load_upscale_model(tmp_path / "evil.pth")
    (tmp_path / "cut.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ModelLoadError):
        load_upscale_model(tmp_path / "cut.safetensors")
