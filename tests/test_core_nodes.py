"""ComfyUI's core latent, conditioning, mask and image-filter nodes, against values worked out by hand, and
inpainting through the executor: the noise mask keeps the unmasked latent exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.workflows import nano_prompt, run
from zimage_serve.engine.model_sampling import FlowSampling
from zimage_serve.engine.parts import prepare_mask
from zimage_serve.engine.text import PromptEmbedding
from zimage_serve.limits import Limits
from zimage_serve.workflow.execute import Executor
from zimage_serve.workflow.folders import Folders
from zimage_serve.workflow.nodes import NODES
from zimage_serve.workflow.nodes.image_ops import gaussian_kernel
from zimage_serve.workflow.spec import node_info


class Context:
    """What a node's `run` reads from its context in these tests."""

    limits = Limits()

    @staticmethod
    def interrupted() -> bool:
        return False


def node(name: str, **inputs: Any) -> tuple[Any, ...]:
    return NODES[name]().run(Context(), **inputs).outputs  # type: ignore[arg-type]


# -- latents --------------------------------------------------------------------------------------------


def test_set_latent_noise_mask_adds_comfyuis_key() -> None:
    latent = {"samples": torch.zeros(1, 16, 4, 4), "batch_index": [3]}
    [out] = node("SetLatentNoiseMask", samples=latent, mask=torch.ones(2, 32, 32))
    assert out["noise_mask"].shape == (2, 1, 32, 32) and out["batch_index"] == [3]
    assert "noise_mask" not in latent  # the input is not changed


def test_prepare_mask_resizes_bilinearly_to_every_channel_and_image() -> None:
    mask = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    out = prepare_mask(mask, torch.Size((3, 16, 2, 2)))
    assert out.shape == (3, 16, 2, 2) and torch.equal(out[2, 7], mask[0])
    half = prepare_mask(torch.ones(1, 8, 8), torch.Size((1, 16, 4, 4)))
    assert torch.equal(half, torch.ones(1, 16, 4, 4))


def test_latent_upscale_keeps_the_aspect_when_one_side_is_zero() -> None:
    latent = {"samples": torch.randn(1, 16, 8, 16)}
    [out] = node("LatentUpscale", samples=latent, upscale_method="nearest-exact", width=0, height=128, crop="disabled")
    assert out["samples"].shape == (1, 16, 16, 32)  # 128 px high, 256 px wide
    [small] = node("LatentUpscale", samples=latent, upscale_method="bilinear", width=8, height=8, crop="disabled")
    assert small["samples"].shape == (1, 16, 8, 8)  # at least 64 pixels a side, as ComfyUI
    [same] = node("LatentUpscale", samples=latent, upscale_method="bilinear", width=0, height=0, crop="disabled")
    assert same is latent


def test_latent_upscale_by_rounds_each_side() -> None:
    [out] = node("LatentUpscaleBy", samples={"samples": torch.randn(1, 16, 5, 7)}, upscale_method="area", scale_by=1.5)
    assert out["samples"].shape == (1, 16, round(7.5), round(10.5))


def test_bislerp_keeps_a_grid_and_interpolates_opposite_vectors_linearly() -> None:
    x = torch.randn(1, 16, 3, 5)
    [same] = node("LatentUpscaleBy", samples={"samples": x}, upscale_method="bislerp", scale_by=1.0)
    assert torch.allclose(same["samples"], x, atol=1e-5)
    # Two orthogonal unit vectors: halfway along the sphere is their normalised sum, of length one.
    a, b = torch.zeros(16), torch.zeros(16)
    a[0], b[1] = 1.0, 1.0
    pair = torch.stack([a, b], dim=-1).reshape(1, 16, 1, 2)
    [wide] = node("LatentUpscale", samples={"samples": pair}, upscale_method="bislerp", width=64 * 4 // 1, height=64,
                  crop="disabled")  # fmt: skip
    cells = wide["samples"][0, :, 0]  # 32 cells across; positions (i + 0.5) · 2/32 - 0.5
    source = (torch.arange(32) + 0.5) * 2 / 32 - 0.5
    t = source.clamp(0, 1)
    expected_first = torch.sin((1 - t) * math.pi / 2)
    assert torch.allclose(cells[0], expected_first, atol=1e-5)
    assert torch.allclose(cells.norm(dim=0), torch.ones(32), atol=1e-5)


def test_repeat_latent_batch_repeats_masks_and_indices() -> None:
    latent = {"samples": torch.randn(2, 16, 2, 2), "noise_mask": torch.ones(1, 1, 16, 16), "batch_index": [4, 5]}
    [out] = node("RepeatLatentBatch", samples=latent, amount=3)
    assert out["samples"].shape == (6, 16, 2, 2) and torch.equal(out["samples"][4], latent["samples"][0])
    assert out["noise_mask"].shape == (6, 1, 16, 16)
    assert out["batch_index"] == [4, 5, 6, 7, 8, 9]


# -- conditioning ---------------------------------------------------------------------------------------


def entry(tokens: int, value: float) -> PromptEmbedding:
    return PromptEmbedding(torch.full((tokens, 4), value), tokens, 0)


def test_conditioning_combine_and_concat() -> None:
    a, b, c = entry(3, 1.0), entry(2, 2.0), entry(5, 3.0)
    [combined] = node("ConditioningCombine", conditioning_1=[a], conditioning_2=[b, c])
    assert combined == [a, b, c]
    [joined] = node("ConditioningConcat", conditioning_to=[a, b], conditioning_from=[c, a])
    assert [e.embeds.shape[0] for e in joined] == [8, 7] and [e.token_count for e in joined] == [8, 7]
    assert torch.equal(joined[0].embeds[3:], c.embeds) and torch.equal(joined[1].embeds[:2], b.embeds)


def test_timestep_range_maps_percent_to_sigma_with_the_shift() -> None:
    [ranged] = node("ConditioningSetTimestepRange", conditioning=[entry(1, 1.0)], start=0.25, end=0.5)
    assert (ranged[0].start_percent, ranged[0].end_percent) == (0.25, 0.5)
    sampling = FlowSampling(shift=3.0)
    high, low = sampling.sigma_range(0.25, 0.5)
    assert math.isclose(high, 3 * 0.75 / (1 + 2 * 0.75)) and math.isclose(low, 3 * 0.5 / (1 + 2 * 0.5))
    assert sampling.sigma_range(0.0, 1.0) == (1.0, 0.0)


# -- masks and image filters ----------------------------------------------------------------------------


def test_grow_mask_dilates_and_erodes_with_tapered_corners() -> None:
    mask = torch.zeros(1, 7, 7)
    mask[0, 3, 3] = 1.0
    [grown] = node("GrowMask", mask=mask, expand=2, tapered_corners=True)
    rows = (grown[0] > 0).int().tolist()
    assert rows[3] == [0, 1, 1, 1, 1, 1, 0] and rows[1] == [0, 0, 0, 1, 0, 0, 0]  # a diamond
    [square] = node("GrowMask", mask=mask, expand=1, tapered_corners=False)
    assert int(square.sum()) == 9
    [back] = node("GrowMask", mask=square, expand=-1, tapered_corners=False)
    assert torch.equal(back, mask)


def test_load_image_mask_reads_one_channel(tmp_path: Path) -> None:
    executor = Executor(NODES, Folders.default(tmp_path, []), None)  # type: ignore[arg-type]
    executor.folders.input.mkdir(parents=True)
    pixels = np.zeros((2, 3, 4), dtype=np.uint8)
    pixels[..., 0], pixels[..., 3] = 255, 64
    Image.fromarray(pixels, "RGBA").save(executor.folders.input / "m.png")

    class Ctx(Context):
        folders = executor.folders

    red = NODES["LoadImageMask"]().run(Ctx(), image="m.png", channel="red").outputs[0]  # type: ignore[arg-type]
    alpha = NODES["LoadImageMask"]().run(Ctx(), image="m.png", channel="alpha").outputs[0]  # type: ignore[arg-type]
    assert red.shape == (1, 2, 3) and torch.equal(red, torch.ones(1, 2, 3))
    assert torch.allclose(alpha, torch.full((1, 2, 3), 1 - 64 / 255))


def test_blur_kernel_spans_minus_one_to_one_and_keeps_a_flat_image() -> None:
    kernel = gaussian_kernel(3, 1.0)
    edge, centre = math.exp(-1 / 2), 1.0  # coordinates -1, 0, 1: weights e^(-d²/2)
    raw = torch.tensor([[edge * edge, edge, edge * edge], [edge, centre, edge], [edge * edge, edge, edge * edge]])
    assert torch.allclose(kernel, raw / raw.sum())
    flat = torch.full((1, 5, 5, 3), 0.3)
    [blurred] = node("ImageBlur", image=flat, blur_radius=2, sigma=1.0)
    assert torch.allclose(blurred, flat)
    step = torch.zeros(1, 1, 4, 1)
    step[0, 0, 2:] = 1.0
    [soft] = node("ImageBlur", image=step.expand(1, 3, 4, 1).contiguous(), blur_radius=1, sigma=1.0)
    w = kernel.sum(0)  # a horizontal step only sees the column sums
    assert torch.allclose(soft[0, 1, 1, 0], w[2]) and torch.allclose(soft[0, 1, 2, 0], w[1] + w[2])


def test_sharpen_keeps_a_flat_image_and_steepens_an_edge() -> None:
    flat = torch.full((1, 5, 5, 3), 0.4)
    [same] = node("ImageSharpen", image=flat, sharpen_radius=1, sigma=1.0, alpha=1.0)
    assert torch.allclose(same, flat, atol=1e-6)
    edge = torch.zeros(1, 4, 6, 3)
    edge[:, :, 3:] = 0.6
    [sharp] = node("ImageSharpen", image=edge, sharpen_radius=1, sigma=1.0, alpha=0.1)
    assert sharp[0, 1, 2, 0] == 0 and sharp[0, 1, 3, 0] > 0.6  # clamped below, overshoot above


def test_pad_for_outpaint_greys_the_border_and_feathers_the_mask() -> None:
    image = torch.ones(1, 100, 100, 3)
    padded, mask = node("ImagePadForOutpaint", image=image, left=8, top=0, right=0, bottom=16, feathering=10)
    assert padded.shape == (1, 116, 108, 3) and padded[0, 110, 50, 0] == 0.5 and padded[0, 50, 50, 0] == 1
    assert mask.shape == (1, 116, 108) and mask[0, 110, 50] == 1 and mask[0, 50, 4] == 1
    # Inside the image: distance to the padded sides (left, bottom) only; ((10 - d) / 10)² within 10 pixels.
    assert mask[0, 50, 8 + 3] == pytest.approx(((10 - 3) / 10) ** 2)
    assert mask[0, 99 - 2, 60] == pytest.approx(((10 - 3) / 10) ** 2)  # 100 - 97 = 3 from the bottom
    assert mask[0, 2, 60] == 0  # no padding on top: the top edge is no border


def test_composite_masked_pastes_through_the_mask() -> None:
    destination = torch.zeros(1, 4, 4, 3)
    source = torch.ones(1, 2, 3, 3)
    mask = torch.tensor([[[1.0, 0.0, 0.5], [1.0, 1.0, 1.0]]])
    [out] = node("ImageCompositeMasked", destination=destination, source=source, x=2, y=1, resize_source=False,
                 mask=mask)  # fmt: skip
    assert out[0, 1, 2:, 0].tolist() == [1.0, 0.0] and out[0, 2, 2:, 0].tolist() == [1.0, 1.0]
    assert out[0, 0].sum() == 0 and destination.sum() == 0  # clipped at the edge; the input is not changed
    [resized] = node("ImageCompositeMasked", destination=destination, source=source, x=0, y=0, resize_source=True)
    assert torch.equal(resized, torch.ones(1, 4, 4, 3))


# -- inpainting through the executor --------------------------------------------------------------------


@pytest.fixture(scope="module")
def executor(tmp_path_factory: pytest.TempPathFactory) -> Executor:
    from zimage_serve.engine.placement import Placement

    folders = Folders.default(tmp_path_factory.mktemp("inpaint"), [])
    folders.input.mkdir(parents=True)
    picture = np.zeros((128, 128, 3), dtype=np.uint8)
    picture[:, :, 0] = np.linspace(0, 255, 128, dtype=np.uint8)[None, :]
    picture[40:90, 30:100, 2] = 200
    Image.fromarray(picture).save(folders.input / "photo.png")
    return Executor(NODES, folders, Placement.choose("cpu"))


def inpaint_graph() -> dict[str, Any]:
    """zimage-nano starting from the photo, encoded, regenerating only its left half (a noise mask), then
    pasting the result back through the same mask, as ComfyUI's inpaint workflows end."""
    graph = nano_prompt()
    kind = {v["class_type"]: k for k, v in graph.items()}
    vae, sampler, decode, save = (kind[c] for c in ("VAELoader", "KSampler", "VAEDecode", "SaveImage"))
    graph["90"] = {"class_type": "LoadImage", "inputs": {"image": "photo.png"}}
    # The outpaint padding's mask is white where it padded: here the left half of a 128 × 128 picture.
    graph["91"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 128, "batch_size": 1, "color": 0}}
    pad = {"image": ["91", 0], "left": 64, "top": 0, "right": 0, "bottom": 0, "feathering": 0}
    graph["92"] = {"class_type": "ImagePadForOutpaint", "inputs": pad}
    graph["93"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["90", 0], "vae": [vae, 0]}}
    graph["94"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["93", 0], "mask": ["92", 1]}}
    graph[sampler]["inputs"]["latent_image"] = ["94", 0]
    graph["95"] = {"class_type": "ImageCompositeMasked",
                   "inputs": {"destination": ["90", 0], "source": [decode, 0], "x": 0, "y": 0, "resize_source": False,
                              "mask": ["92", 1]}}  # fmt: skip
    graph[save]["inputs"]["images"] = ["95", 0]
    return graph


def test_the_noise_mask_keeps_the_unmasked_latent() -> None:
    from zimage_serve.engine.parts import DiffusionModel, LatentFormat, sample
    from zimage_serve.nano.random_model import TinyConfig, build_random_model

    loaded = build_random_model(torch.device("cpu"), torch.float32, TinyConfig())

    model = DiffusionModel("tiny", loaded.transformer, LatentFormat(0.5, 0.1))
    latent = torch.randn(1, 16, 8, 8)
    mask = torch.zeros(1, 8, 8)
    mask[:, :, 4:] = 1.0  # regenerate the right half
    cond = [PromptEmbedding(torch.randn(5, 32), 5, 0)]
    out = sample(model, torch.randn(1, 16, 8, 8), latent, cond, [], cfg=1.0, sampler="euler",
                 sigmas=[1.0, 0.6, 0.3, 0.0], seed=0, denoise_mask=mask)  # fmt: skip
    assert torch.allclose(out[..., :4], latent[..., :4], atol=1e-5)
    assert (out[..., 4:] - latent[..., 4:]).abs().mean() > 0.05
    plain = sample(model, torch.randn(1, 16, 8, 8), latent, cond, [], cfg=1.0, sampler="euler",
                   sigmas=[1.0, 0.6, 0.3, 0.0], seed=0)  # fmt: skip
    assert (plain[..., :4] - latent[..., :4]).abs().mean() > 0.05


def test_an_inpaint_workflow_keeps_the_unmasked_pixels(executor: Executor) -> None:
    graph = inpaint_graph()
    save = next(k for k, v in graph.items() if v["class_type"] == "SaveImage")
    result = run(executor, graph)
    assert result.ok, result.error
    entry = result.outputs[save]["images"][0]
    out = np.asarray(Image.open(executor.folders.output / entry["subfolder"] / entry["filename"]), dtype=np.int16)
    photo = np.asarray(Image.open(executor.folders.input / "photo.png"), dtype=np.int16)
    assert np.array_equal(out[:, 64:], photo[:, 64:])
    assert np.abs(out[:, :64] - photo[:, :64]).mean() > 5


def nano_vae() -> Any:
    from zimage_serve.engine.parts import load_vae
    from zimage_serve.engine.placement import Placement
    from zimage_serve.nano.default import SHIPPED
    from zimage_serve.workflow.nodes.loading import component

    return load_vae("nano", component(SHIPPED, "vae"), Placement.choose("cpu"))


def test_vae_encode_for_inpaint_greys_the_mask_and_grows_the_noise_mask() -> None:
    mask = torch.zeros(1, 32, 32)
    mask[0, 16, 16] = 1.0
    pixels = torch.rand(1, 32, 32, 3)

    vae = nano_vae()
    [latent] = node("VAEEncodeForInpaint", pixels=pixels, vae=vae, mask=mask, grow_mask_by=6)
    grown = latent["noise_mask"][0, 0]
    # A 6 × 6 kernel padded by 3: output o sums inputs o - 3 .. o + 2, so rows and columns 14..19 are set.
    assert grown.shape == (32, 32) and int(grown.sum()) == 36 and grown[14:20, 14:20].all()
    greyed = pixels.clone()
    greyed[0, 16, 16] = 0.5  # the masked pixel, and only it, is grey in what was encoded
    assert torch.equal(latent["samples"], vae.encode(greyed))
    positive, negative, plain = node("InpaintModelConditioning", positive=["p"], negative=["n"], vae=vae,
                                     pixels=pixels, mask=mask, noise_mask=True)  # fmt: skip
    assert (positive, negative) == (["p"], ["n"])
    assert torch.equal(plain["samples"], vae.encode(pixels))  # the photo itself, not greyed
    assert torch.equal(plain["noise_mask"][0, 0], mask[0])


def test_object_info_lists_the_new_nodes_in_comfyuis_shape(executor: Executor) -> None:
    from zimage_serve.workflow.spec import object_info

    info = object_info(NODES, executor.folders)
    assert info["VAEEncodeForInpaint"]["input"]["required"]["grow_mask_by"] == [
        "INT", {"default": 6, "min": 0, "max": 64, "step": 1}
    ]  # fmt: skip
    assert info["InpaintModelConditioning"]["output_name"] == ["positive", "negative", "latent"]
    assert info["LatentUpscale"]["input"]["required"]["upscale_method"][0][-1] == "bislerp"
    assert info["ZImageFunControlnet"]["experimental"] is True
    assert json.dumps(info)  # all of it serialisable


# -- samplers, schedulers and custom sampling through the executor ----------------------------------


def nano_sampler_graph(**sampler: Any) -> dict[str, Any]:
    graph = nano_prompt()
    graph["3"]["inputs"].update(steps=3, seed=9, **sampler)
    return graph


def saved_pixels(executor: Executor, graph: dict[str, Any]) -> np.ndarray:
    result = run(executor, graph)
    assert result.ok, result.error
    entry = result.outputs["9"]["images"][0]
    return np.asarray(Image.open(executor.folders.output / entry["subfolder"] / entry["filename"]), dtype=np.int16)


@pytest.mark.parametrize("sampler", list(__import__("zimage_serve.engine.names").engine.names.SAMPLERS))
def test_every_sampler_runs_a_workflow(executor: Executor, sampler: str) -> None:
    out = saved_pixels(executor, nano_sampler_graph(sampler_name=sampler))
    assert out.shape == (128, 128, 3) and out.std() > 1  # a picture, not a flat field or NaN black


@pytest.mark.parametrize("scheduler", list(__import__("zimage_serve.engine.names").engine.names.SCHEDULERS))
def test_every_scheduler_runs_a_workflow(executor: Executor, scheduler: str) -> None:
    out = saved_pixels(executor, nano_sampler_graph(scheduler=scheduler, sampler_name="euler"))
    assert out.shape == (128, 128, 3) and out.std() > 1


def custom_graph(sampler: str, steps: int) -> dict[str, Any]:
    """The nano workflow with its KSampler taken apart into SamplerCustomAdvanced's parts."""
    graph = nano_prompt()
    k = graph.pop("3")["inputs"]
    graph["50"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 9}}
    guided = {"model": k["model"], "positive": k["positive"], "negative": k["negative"], "cfg": 2.0}
    graph["51"] = {"class_type": "CFGGuider", "inputs": guided}
    graph["52"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": sampler}}
    graph["53"] = {"class_type": "BasicScheduler",
                   "inputs": {"model": k["model"], "scheduler": "simple", "steps": steps, "denoise": 1.0}}  # fmt: skip
    graph["3"] = {"class_type": "SamplerCustomAdvanced",
                  "inputs": {"noise": ["50", 0], "guider": ["51", 0], "sampler": ["52", 0], "sigmas": ["53", 0],
                             "latent_image": k["latent_image"]}}  # fmt: skip
    return graph


def test_sampler_custom_advanced_is_ksampler_taken_apart(executor: Executor) -> None:
    plain = saved_pixels(executor, nano_sampler_graph(sampler_name="heun", cfg=2.0, scheduler="simple"))
    assert np.array_equal(saved_pixels(executor, custom_graph("heun", 3)), plain)
    # Its second output is the last prediction of the clean image; for Euler's last step (to σ = 0) that
    # is the sampled latent itself, to float rounding.
    graph = custom_graph("euler", 3)
    decode = next(k for k, v in graph.items() if v["class_type"] == "VAEDecode")
    first = saved_pixels(executor, graph)
    graph[decode]["inputs"]["samples"] = ["3", 1]
    assert np.abs(saved_pixels(executor, graph) - first).max() <= 1


def test_basic_guider_and_disable_noise(executor: Executor) -> None:
    graph = custom_graph("euler", 3)
    guided = graph["51"]["inputs"]
    graph["51"] = {
        "class_type": "BasicGuider",
        "inputs": {"model": guided["model"], "conditioning": guided["positive"]},
    }
    at_cfg1 = saved_pixels(executor, graph)
    assert np.array_equal(at_cfg1, saved_pixels(executor, nano_sampler_graph(sampler_name="euler", cfg=1.0)))
    graph["50"] = {"class_type": "DisableNoise", "inputs": {}}
    assert np.abs(saved_pixels(executor, graph) - at_cfg1).mean() > 1


def test_timestep_ranges_decide_which_prompt_steers_each_step(executor: Executor) -> None:
    """Two prompts over halves of the schedule differ from either prompt alone."""
    graph = nano_sampler_graph(sampler_name="euler")
    clip = graph["6"]["inputs"]["clip"]
    graph["60"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a blue square", "clip": clip}}
    graph["61"] = {
        "class_type": "ConditioningSetTimestepRange",
        "inputs": {"conditioning": ["6", 0], "start": 0.0, "end": 0.5},
    }
    graph["62"] = {
        "class_type": "ConditioningSetTimestepRange",
        "inputs": {"conditioning": ["60", 0], "start": 0.5, "end": 1.0},
    }
    graph["63"] = {
        "class_type": "ConditioningCombine",
        "inputs": {"conditioning_1": ["61", 0], "conditioning_2": ["62", 0]},
    }
    alone = saved_pixels(executor, graph)
    graph["3"]["inputs"]["positive"] = ["63", 0]
    split = saved_pixels(executor, graph)
    graph["3"]["inputs"]["positive"] = ["60", 0]
    other = saved_pixels(executor, graph)
    assert np.abs(split - alone).mean() > 0.5 and np.abs(split - other).mean() > 0.5


def test_canny_marks_a_step_edge_and_nothing_else() -> None:
    """A vertical step from black to white: after the Gaussian (kernel 5) and non-maximum suppression the
    one-pixel-wide edge lies where the gradient peaks, between columns 7 and 8; flat regions stay black."""
    image = torch.zeros(1, 16, 16, 3)
    image[:, :, 8:] = 1.0
    [edges] = node("Canny", image=image, low_threshold=0.1, high_threshold=0.32)
    assert edges.shape == (1, 16, 16, 3) and torch.equal(edges[..., 0], edges[..., 2])
    columns = {int(c) for c in torch.nonzero(edges[0, 4:12, :, 0])[:, 1]}
    assert columns and columns <= {7, 8}
    assert edges[0, :, :5].sum() == 0 and edges[0, :, 11:].sum() == 0
    with pytest.raises(ValueError, match=r"low_threshold 0\.5 and high_threshold 0\.2"):
        node("Canny", image=image, low_threshold=0.5, high_threshold=0.2)


def test_scale_to_total_pixels_keeps_the_aspect_and_rounds_to_steps() -> None:
    image = torch.rand(1, 512, 1024, 3)
    # 0.25 MP of a 1024 × 512 picture: factor √(262144 / 524288) = 0.7071 → 724 × 362.
    [out] = node("ImageScaleToTotalPixels", image=image, upscale_method="area", megapixels=0.25)
    assert out.shape == (1, 362, 724, 3)
    # With resolution_steps 64 each side rounds to a multiple of it: 724.08 → 704, 362.04 → 384.
    [stepped] = node(
        "ImageScaleToTotalPixels", image=image, upscale_method="area", megapixels=0.25, resolution_steps=64
    )
    assert stepped.shape == (1, 384, 704, 3)


def test_basic_scheduler_takes_the_tail_for_a_partial_denoise() -> None:
    from zimage_serve.engine.parts import FLUX_LATENT, DiffusionModel

    model = DiffusionModel("no weights needed", None, FLUX_LATENT).with_shift(3.0)  # only its schedule is read
    [full] = node("BasicScheduler", model=model, scheduler="simple", steps=4, denoise=1.0)
    [half] = node("BasicScheduler", model=model, scheduler="simple", steps=4, denoise=0.5)
    [none] = node("BasicScheduler", model=model, scheduler="simple", steps=4, denoise=0.0)
    assert full == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0], abs=1e-4)
    assert half == pytest.approx([0.75, 0.6429, 0.5, 0.3, 0.0], abs=1e-4) and none == []


# -- sizes ----------------------------------------------------------------------------------------------


def test_resolution_selector_gives_comfyuis_sizes_and_feeds_a_latent(tmp_path: Path) -> None:
    assert node("ResolutionSelector", aspect_ratio="1:1 (Square)", megapixels=1.0, multiple=8) == (1024, 1024)
    # 16:9 at 1 MP: each side is 16 or 9 times √(1 MP / 144), to the nearest 8
    assert node("ResolutionSelector", aspect_ratio="16:9 (Widescreen)", megapixels=1.0, multiple=8) == (1368, 768)
    assert node("ResolutionSelector", aspect_ratio="3:2 (Photo)", megapixels=2.0, multiple=64) == (1792, 1152)
    assert node("ResolutionSelector", aspect_ratio="9:16 (Portrait Widescreen)", megapixels=0.1) == (240, 432)
    spec = node_info("ResolutionSelector", NODES["ResolutionSelector"], Folders.default(tmp_path, []))
    required = spec["input"]["required"]
    assert required["aspect_ratio"][0][0] == "1:1 (Square)" and len(required["aspect_ratio"][0]) == 8
    assert required["multiple"][1]["advanced"] is True and spec["output"] == ["INT", "INT"]
    assert spec["output_name"] == ["width", "height"] and spec["category"] == "utilities"
    # Its outputs set a latent's size, as the official template wires them.
    width, height = node("ResolutionSelector", aspect_ratio="4:3 (Standard)", megapixels=0.1, multiple=8)
    [latent] = node("EmptySD3LatentImage", width=width, height=height, batch_size=1)
    assert tuple(latent["samples"].shape[-2:]) == (height // 8, width // 8)
