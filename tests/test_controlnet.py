"""The Z-Image Fun ControlNet Union: the official template unchanged, every variant told apart, strength,
the inpaint input, the diffusers folder, and LoRA and FP8 beside a patch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tests.checkpoints import copy_tokenizer, diffusers_state, write_comfy_root
from tests.controlnets import build_controlnet, write_controlnet, write_controlnet_folder
from tests.loras import lora_pairs, write_diffusers
from tests.workflows import TEMPLATES, saved_image, validate
from zimage_serve.engine.checkpoint import Checkpoint
from zimage_serve.engine.control_hooks import _Stream
from zimage_serve.engine.control_patch import ControlPatch
from zimage_serve.engine.controlnet import ControlNetError, FunControlNet, detect_variant
from zimage_serve.engine.devices import MemoryMode
from zimage_serve.engine.parts import FLUX_LATENT
from zimage_serve.engine.placement import Placement
from zimage_serve.engine.residency import FixedBudget, Residency
from zimage_serve.errors import ModelLoadError
from zimage_serve.workflow.execute import Executor
from zimage_serve.workflow.folders import Folders
from zimage_serve.workflow.nodes import NODES
from zimage_serve.workflow.ui_format import to_api

TEMPLATE = TEMPLATES / "image_z_image_turbo_fun_union_controlnet.json"
PATCH_FILE = "Z-Image-Turbo-Fun-Controlnet-Union.safetensors"
INPUT_IMAGE = "image_z_image_turbo_fun_union_controlnet_input_image.png"
# alibaba-pai's later files: ControlNets for Turbo at 8 steps, and Tile ones that re-detail an upscaled picture
PUBLISHED_21 = {
    "Z-Image-Turbo-Fun-Controlnet-Union-2.1-8steps.safetensors": "2.1",
    "Z-Image-Turbo-Fun-Controlnet-Union-2.1-2601-8steps.safetensors": "2.1",
    "Z-Image-Turbo-Fun-Controlnet-Union-2.1-lite-2601-8steps.safetensors": "2.1 lite",
    "Z-Image-Turbo-Fun-Controlnet-Tile-2.1-8steps.safetensors": "2.1",
    "Z-Image-Turbo-Fun-Controlnet-Tile-2.1-lite-2601-8steps.safetensors": "2.1 lite",
}
TILE = "Z-Image-Turbo-Fun-Controlnet-Tile-2.1-8steps.safetensors"


def picture(size: int = 64) -> Image.Image:
    """Something with edges for Canny: a light disc and a bar on a dark ground."""
    image = Image.new("RGB", (size, size), (20, 30, 40))
    draw = ImageDraw.Draw(image)
    draw.ellipse((size // 8, size // 8, size // 2, size // 2), fill=(230, 220, 40))
    draw.rectangle((size // 2, size * 5 // 8, size - 4, size - 10), fill=(200, 60, 60))
    return image


@pytest.fixture(scope="module")
def executor(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Executor:
    """ComfyUI's file names, as the template names them, and a patch of every variant beside the official one."""
    root = write_comfy_root(tiny_model, tmp_path_factory.mktemp("controlnet") / "models")
    copy_tokenizer(tiny_model, root / "text_encoders" / "qwen_3_4b_tokenizer")
    patches = root / "model_patches"
    write_controlnet(patches / PATCH_FILE, "1.0")
    for version in ("2.0", "2.1", "2.1 lite"):
        write_controlnet(patches / f"union-{version.replace(' ', '-')}.safetensors", version, seed=1)
    for name, version in PUBLISHED_21.items():  # the 8-step and Tile files, in the layouts they share with 2.1
        write_controlnet(patches / name, version, seed=2)
    write_controlnet_folder(patches / "union-2.1-diffusers", "2.1", seed=1)
    (root / "loras").mkdir(exist_ok=True)
    write_diffusers(
        lora_pairs(diffusers_state(tiny_model / "transformer"), scale=0.2), root / "loras" / "style.safetensors"
    )
    data = tmp_path_factory.mktemp("data")
    folders = Folders.default(data, [root])
    folders.input.mkdir(parents=True)
    picture().save(folders.input / INPUT_IMAGE)
    return Executor(NODES, folders, Placement.choose("cpu"))


def template() -> dict[str, Any]:
    graph = to_api(json.loads(TEMPLATE.read_text(encoding="utf-8")), NODES)
    graph["44"]["inputs"]["steps"] = 4  # the template's 9 steps, cut for time where a test says so
    return graph


def image(executor: Executor, graph: dict[str, Any]) -> np.ndarray:
    return saved_image(executor, graph, "9")


def without_patch(graph: dict[str, Any]) -> dict[str, Any]:
    graph = json.loads(json.dumps(graph))
    graph["47"]["inputs"]["model"] = ["46", 0]
    for node in ("60", "64"):
        del graph[node]
    return graph


def test_the_template_is_the_controlnet_graph() -> None:
    graph = to_api(json.loads(TEMPLATE.read_text(encoding="utf-8")), NODES)
    assert graph["64"] == {
        "class_type": "ModelPatchLoader",
        "inputs": {"name": PATCH_FILE},
        "_meta": graph["64"]["_meta"],
    }
    assert graph["60"]["inputs"]["image"] == ["57", 0] and graph["60"]["inputs"]["strength"] == 1
    assert graph["57"]["inputs"]["image"] == ["58", 0]  # ImageScaleToMaxDimension is bypassed (mode 4)
    assert graph["41"]["inputs"]["width"] == ["69", 0] and graph["41"]["inputs"]["height"] == ["69", 1]
    assert "62" not in graph and "65" not in graph  # the bypassed node and the Note are gone
    sampler = graph["44"]["inputs"]
    assert (sampler["steps"], sampler["cfg"], sampler["sampler_name"]) == (9, 1, "res_multistep")


def test_the_template_runs_unchanged(executor: Executor) -> None:
    graph = to_api(json.loads(TEMPLATE.read_text(encoding="utf-8")), NODES)
    out = image(executor, graph)
    assert out.shape == (64, 64, 3)  # GetImageSize of the input set the latent's size


def test_strength_matters_and_zero_equals_no_controlnet(executor: Executor) -> None:
    graph = template()
    full = image(executor, graph)
    graph["60"]["inputs"]["strength"] = 0.4
    weaker = image(executor, graph)
    graph["60"]["inputs"]["strength"] = 0.0
    none_at_all = image(executor, graph)
    plain = image(executor, without_patch(graph))
    assert np.abs(full - weaker).mean() > 1 and np.abs(full - plain).mean() > 1
    assert np.array_equal(none_at_all, plain)


def test_the_control_image_matters(executor: Executor) -> None:
    graph = template()
    first = image(executor, graph)
    Image.fromarray(255 - np.asarray(picture())).save(executor.folders.input / "other.png")
    graph["58"]["inputs"]["image"] = "other.png"
    assert np.abs(first - image(executor, graph)).mean() > 1


@pytest.mark.parametrize(
    ("name", "version", "layers", "channels", "refiner", "broken"),
    [
        (PATCH_FILE, "1.0", 6, 16, "plain", False),
        ("union-2.0.safetensors", "2.0", 15, 33, "control_layers", True),
        ("union-2.1.safetensors", "2.1", 15, 33, "own", False),
        ("union-2.1-lite.safetensors", "2.1 lite", 3, 33, "own", False),
    ],
)
def test_each_variant_is_told_apart_by_its_keys(
    executor: Executor, name: str, version: str, layers: int, channels: int, refiner: str, broken: bool
) -> None:
    variant = detect_variant(Checkpoint.open(executor.folders.resolve("model_patches", name)))
    assert (variant.version, variant.layers, variant.in_channels, variant.refiner, variant.broken) == (
        version, layers, channels, refiner, broken
    )  # fmt: skip
    assert (variant.dim, variant.heads) == (64, 2)
    assert ("broken release" in variant.describe()) is broken


def test_every_variant_runs_the_template(executor: Executor) -> None:
    graph = template()
    graph["44"]["inputs"]["steps"] = 2
    images = {}
    for name in ("union-2.0.safetensors", "union-2.1.safetensors", "union-2.1-lite.safetensors"):
        graph["64"]["inputs"]["name"] = name
        images[name] = image(executor, graph)
    a, b, c = images.values()
    assert np.abs(a - b).mean() > 0.5 and np.abs(b - c).mean() > 0.5


def test_a_diffusers_folder_is_the_same_controlnet(executor: Executor) -> None:
    assert "union-2.1-diffusers" in executor.folders.names("model_patches")
    graph = template()
    graph["64"]["inputs"]["name"] = "union-2.1.safetensors"
    from_file = image(executor, graph)
    graph["64"]["inputs"]["name"] = "union-2.1-diffusers"
    assert np.array_equal(from_file, image(executor, graph))


def test_inpaint_inputs_steer_a_2x_patch(executor: Executor) -> None:
    """ZImageFunControlnet with an image to inpaint and a mask: each input changes the result."""
    graph = template()
    graph["64"]["inputs"]["name"] = "union-2.1.safetensors"
    graph["60"] = {
        "class_type": "ZImageFunControlnet",
        "inputs": {"model": ["46", 0], "model_patch": ["64", 0], "vae": ["40", 0], "strength": 1.0,
                   "inpaint_image": ["58", 0]},
    }  # fmt: skip
    inpaint_only = image(executor, graph)
    graph["80"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}}
    graph["60"]["inputs"]["mask"] = ["80", 0]
    all_masked = image(executor, graph)  # white everywhere: regenerate all, nothing of the image kept
    graph["60"]["inputs"]["image"] = ["57", 0]
    with_control = image(executor, graph)
    assert np.abs(inpaint_only - all_masked).mean() > 0.5 and np.abs(all_masked - with_control).mean() > 0.5


def test_the_inpaint_input_is_built_as_comfyui_builds_it(executor: Executor) -> None:
    """[control latent, keep mask (1 - mask, nearest), latent of the image with its masked part grey]."""
    from zimage_serve.engine.parts import load_vae
    from zimage_serve.workflow.nodes.loading import component

    vae = load_vae("ae", component(executor.folders.resolve("vae", "ae.safetensors"), "vae"), Placement.choose("cpu"))
    net = FunControlNet("t", build_controlnet("2.1").float(), detect_variant_of("2.1"))
    pixels = torch.from_numpy(np.asarray(picture(), dtype=np.float32) / 255)[None]
    mask = torch.zeros(1, 64, 64)
    mask[:, :, 32:] = 1.0  # regenerate the right half
    context = ControlPatch(net, vae, 1.0, image=pixels, inpaint_image=pixels, mask=mask).context(
        8, 8, FLUX_LATENT, None
    )
    assert context.shape == (1, 33, 8, 8)
    control = FLUX_LATENT.process_in(vae.encode(pixels))
    assert torch.allclose(context[:, :16], control)
    keep = context[0, 16]
    assert torch.equal(keep[:, :4], torch.ones(8, 4)) and torch.equal(keep[:, 4:], torch.zeros(8, 4))
    grey_right = pixels.clone()
    grey_right[:, :, 32:] = 0.5
    assert torch.allclose(context[:, 17:], FLUX_LATENT.process_in(vae.encode(grey_right)))
    # Without an inpaint image the image to inpaint is grey; without a mask nothing is kept.
    bare = ControlPatch(net, vae, 1.0, image=pixels).context(8, 8, FLUX_LATENT, None)
    assert torch.equal(bare[:, 16], torch.zeros(1, 8, 8))
    assert torch.allclose(bare[:, 17:], FLUX_LATENT.process_in(vae.encode(torch.full_like(pixels, 0.5))))


def detect_variant_of(version: str) -> Any:
    path = Path("/tmp") / f"zimage-variant-{version.replace(' ', '-')}.safetensors"
    return detect_variant(Checkpoint.open(write_controlnet(path, version)))


@pytest.mark.parametrize(("main", "layers", "fed"), [(30, 6, [0, 5, 10, 15, 20, 25]), (30, 15, list(range(0, 30, 2))),
                                                       (30, 3, [0, 10, 20]), (2, 6, [0, 1])])  # fmt: skip
def test_control_layer_k_feeds_main_block_k_times_round_blocks_over_layers(
    main: int, layers: int, fed: list[int]
) -> None:
    version = {6: "1.0", 15: "2.1", 3: "2.1 lite"}[layers]
    net = FunControlNet("t", build_controlnet(version).float(), detect_variant_of(version))
    patch = ControlPatch(net, None, 1.0, image=torch.zeros(1, 16, 16, 3))  # type: ignore[arg-type]
    stream = _Stream(patch, torch.randn(1, net.variant.in_channels, 4, 4), main)
    tokens = torch.randn(1, 4, 64)
    freqs = torch.polar(torch.ones(1, 4, 16), torch.randn(1, 4, 16))
    stream.start(tokens, freqs, torch.randn(1, 64))
    stream.main_input = tokens
    changed = [b for b in range(main) if not torch.equal(stream.after_main(b, tokens), tokens)]
    assert changed == fed and stream.next_layer == len(fed)


def test_a_patch_for_another_width_is_refused(executor: Executor, tmp_path: Path) -> None:
    wide = build_controlnet("1.0", dim=128, heads=4)
    path = tmp_path / "wide.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in wide.state_dict().items()}, str(path))
    shutil.copy(path, executor.folders.models[0] / "model_patches" / "wide.safetensors")
    graph = template()
    graph["64"]["inputs"]["name"] = "wide.safetensors"
    checked = validate(graph, executor.folders)
    result = executor.run("wide", checked.prompt, checked.outputs, {}, None)
    assert not result.ok
    assert "128 wide with 4 heads" in json.dumps(result.error)


def test_files_that_are_no_controlnet_are_named(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"layers.0.weight": torch.zeros(2, 2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ModelLoadError, match="not a Z-Image Fun ControlNet"):
        detect_variant(Checkpoint.open(tmp_path / "x.safetensors"))
    state = build_controlnet("2.1").state_dict()
    save_file(
        {k: v for k, v in state.items() if not k.startswith("control_layers.3.")}, str(tmp_path / "gap.safetensors")
    )
    with pytest.raises(ModelLoadError, match="not numbered"):
        detect_variant(Checkpoint.open(tmp_path / "gap.safetensors"))
    with pytest.raises(ControlNetError, match="image"):
        ControlPatch(FunControlNet("t", None, detect_variant_of("1.0")), None, 1.0)  # type: ignore[arg-type]


def test_lora_and_fp8_work_with_a_patch_applied(executor: Executor) -> None:
    graph = template()
    graph["44"]["inputs"]["steps"] = 2
    patched = image(executor, graph)
    graph["70"] = {"class_type": "LoraLoaderModelOnly",
                   "inputs": {"model": ["46", 0], "lora_name": "style.safetensors", "strength_model": 1.0}}  # fmt: skip
    graph["60"]["inputs"]["model"] = ["70", 0]
    with_lora = image(executor, graph)
    graph["46"]["inputs"]["weight_dtype"] = "fp8_e4m3fn"
    with_fp8 = image(executor, graph)
    assert np.abs(patched - with_lora).mean() > 0.5 and np.abs(with_lora - with_fp8).mean() > 0


def test_a_patch_with_a_lora_gives_the_same_image_under_smart_memory_on_a_small_card(executor: Executor) -> None:
    """The ControlNet is held on the card beside the transformer while it steers; the others move around it."""
    graph = template()
    graph["44"]["inputs"]["steps"] = 2
    graph["70"] = {"class_type": "LoraLoaderModelOnly",
                   "inputs": {"model": ["46", 0], "lora_name": "style.safetensors", "strength_model": 1.0}}  # fmt: skip
    graph["60"]["inputs"]["model"] = ["70", 0]
    cpu = torch.device("cpu")
    residency = Residency(cpu, FixedBudget(3_700_000, calls_take=0))  # the model and patch: 5.3 MB
    placement = Placement(cpu, torch.float32, torch.float32, memory_mode=MemoryMode.SMART, residency=residency)
    smart = Executor(NODES, executor.folders, placement)
    assert np.array_equal(image(smart, graph), image(executor, graph))
    assert len(residency._components()) == 4  # text encoder, transformer, VAE and the ControlNet
    assert residency.moved_in > sum(c.footprint.total for c in residency._components())


# -- zimage generate ----------------------------------------------------------------------------------


def generate(executor: Executor, capsys: pytest.CaptureFixture[str], out: Path, *args: str) -> tuple[int, str]:
    from tests.test_cli import run

    root = executor.folders.models[0]
    model = ["--model", str(root), "--tokenizer", str(root / "text_encoders" / "qwen_3_4b_tokenizer")]
    code, _, stderr = run(["generate", "a red disc", "-o", str(out), "--seed", "5", "--steps", "4", *model, *args],
                          capsys)  # fmt: skip
    return code, stderr


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_generate_with_a_control_image_is_the_workflows_image(
    executor: Executor, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`zimage generate --control-image` and QwenImageDiffsynthControlnet share one path: the same image."""
    edges = tmp_path / "edges.png"
    Image.fromarray(255 - np.asarray(picture())).save(edges)
    Image.fromarray(255 - np.asarray(picture())).save(executor.folders.input / "edges.png")
    code, stderr = generate(executor, capsys, tmp_path / "g.png", "--control-image", str(edges), "--control-type",
                            "raw", "--controlnet", str(executor.folders.resolve("model_patches", PATCH_FILE)),
                            "--control-strength", "0.8")  # fmt: skip
    assert code == 0, stderr
    assert "Fun ControlNet Union 1.0" in stderr
    graph = template()
    graph["57"] = {"class_type": "ImageInvert", "inputs": {"image": ["80", 0]}}  # not Canny: the raw map
    graph["80"] = {"class_type": "ImageInvert", "inputs": {"image": ["58", 0]}}
    graph["58"]["inputs"]["image"] = "edges.png"
    graph["44"]["inputs"].update(seed=5, steps=4, sampler_name="euler", scheduler="simple")
    graph["45"]["inputs"]["text"] = "a red disc"
    graph["60"]["inputs"]["strength"] = 0.8
    # 4 steps of generate's schedule are ComfyUI's "simple" ones (1000 / 4 is whole); the negative is unused.
    assert np.abs(pixels(tmp_path / "g.png") - image(executor, graph)).max() <= 1


def test_generate_finds_the_one_controlnet_or_asks_for_it(
    executor: Executor, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    edges = tmp_path / "edges.png"
    picture().save(edges)
    code, stderr = generate(executor, capsys, tmp_path / "g.png", "--control-image", str(edges))
    assert code == 2 and "--controlnet" in stderr and "found in" in stderr  # this root holds several


def test_generate_inpaints_and_keeps_the_rest(
    executor: Executor, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    source, mask = tmp_path / "photo.png", tmp_path / "mask.png"
    picture().save(source)
    white_left = np.zeros((64, 64), dtype=np.uint8)
    white_left[:, :32] = 255
    Image.fromarray(white_left).save(mask)
    for extra in ([], ["--controlnet", str(executor.folders.resolve("model_patches", "union-2.1.safetensors"))]):
        out = tmp_path / f"inpainted{len(extra)}.png"
        code, stderr = generate(executor, capsys, out, "--image", str(source), "--mask", str(mask), *extra)
        assert code == 0, stderr
        made, kept = pixels(out), pixels(source)
        assert made.shape == (64, 64, 3)  # the size of --image
        assert np.array_equal(made[:, 32:], kept[:, 32:]) and np.abs(made[:, :32] - kept[:, :32]).mean() > 5


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--mask", "m.png"], "--image"),
        (["--control-image", "p.png", "--control-type", "depth"], "--control-type"),
        (["--control-image", "missing.png", "--controlnet", "x"], "--control-image"),
        (["--control-image", "p.png", "--canny-low", "0.5", "--canny-high", "0.2"], "--canny-low"),
        (["--control-image", "p.png", "--control-strength", "nan"], "--control-strength"),
    ],
)
def test_generate_names_the_option_at_fault(
    executor: Executor, capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str], named: str
) -> None:
    picture().save(tmp_path / "p.png")
    picture().save(tmp_path / "m.png")
    args = [str(tmp_path / a) if a.endswith(".png") else a for a in args]
    code, stderr = generate(executor, capsys, tmp_path / "x.png", *args)
    assert code == 2 and named in stderr and "Traceback" not in stderr


def test_generate_refuses_to_inpaint_with_a_1_0_patch(
    executor: Executor, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    picture().save(tmp_path / "p.png")
    patch = str(executor.folders.resolve("model_patches", PATCH_FILE))
    code, stderr = generate(executor, capsys, tmp_path / "x.png", "--image", str(tmp_path / "p.png"), "--mask",
                            str(tmp_path / "p.png"), "--controlnet", patch)  # fmt: skip
    assert code == 1 and "cannot inpaint" in stderr and "Traceback" not in stderr


def test_the_readme_commands_run_the_template_and_name_the_variant(
    executor: Executor, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from tests.test_cli import run

    root = executor.folders.models[0]
    code, stdout, stderr = run(["run", str(TEMPLATE), "--models", str(root), "--input-dir", str(executor.folders.input),
                                "--output-dir", str(tmp_path), "--set", "44.steps=2"], capsys)  # fmt: skip
    assert code == 0, stderr
    assert Image.open(stdout.strip().splitlines()[-1]).size == (64, 64)
    code, stdout, _ = run(["models", str(root / "model_patches" / "union-2.0.safetensors")], capsys)
    assert code == 0 and "Fun ControlNet Union 2.0" in stdout and "broken release" in stdout


def test_generate_crops_the_mask_with_its_picture(
    executor: Executor, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A 96×64 picture made 64×64 loses 16 columns each side; its mask must lose the same ones."""
    source, mask = tmp_path / "wide.png", tmp_path / "wide-mask.png"
    wide = np.zeros((64, 96, 3), dtype=np.uint8)
    wide[:, :, 1] = np.linspace(0, 255, 96, dtype=np.uint8)[None, :]
    Image.fromarray(wide).save(source)
    white = np.zeros((64, 96), dtype=np.uint8)
    white[:, 48:80] = 255  # columns 32..63 once cropped
    Image.fromarray(white).save(mask)
    out = tmp_path / "crop.png"
    code, stderr = generate(executor, capsys, out, "--image", str(source), "--mask", str(mask), "--width", "64",
                            "--height", "64")  # fmt: skip
    assert code == 0, stderr
    made, kept = pixels(out), wide[:, 16:80].astype(np.int16)
    assert np.array_equal(made[:, :32], kept[:, :32])
    assert (np.abs(made[:, 32:] - kept[:, 32:]).mean(axis=(0, 2)) > 1).all()  # every masked column is new


@pytest.mark.parametrize(("name", "version"), PUBLISHED_21.items())
def test_the_8_step_and_tile_files_are_told_apart_as_2_1_and_lite(executor: Executor, name: str, version: str) -> None:
    variant = detect_variant(Checkpoint.open(executor.folders.resolve("model_patches", name)))
    assert variant.version == version and variant.inpaint


def tile_graph(patch: str, strength: float) -> dict[str, Any]:
    """Upscale, then control: a 32² picture made 64² with Lanczos, re-detailed by a Tile ControlNet at 8 steps."""
    graph = template()
    graph["58"]["inputs"]["image"] = "small.png"
    graph["57"] = {"class_type": "ImageScaleBy", "inputs": {"image": ["58", 0], "upscale_method": "lanczos",
                                                           "scale_by": 2.0}}  # in Canny's place  # fmt: skip
    graph["69"]["inputs"]["image"] = ["57", 0]  # the latent takes the upscaled size
    graph["64"]["inputs"]["name"] = patch
    graph["60"]["inputs"]["strength"] = strength
    graph["44"]["inputs"]["steps"] = 8
    return graph


@pytest.mark.parametrize("patch", [TILE, "Z-Image-Turbo-Fun-Controlnet-Tile-2.1-lite-2601-8steps.safetensors"])
def test_a_tile_controlnet_redetails_an_upscaled_picture(executor: Executor, patch: str) -> None:
    picture(32).save(executor.folders.input / "small.png")
    steered = image(executor, tile_graph(patch, 0.75))
    assert steered.shape == (64, 64, 3)  # twice the picture
    assert np.abs(steered - image(executor, tile_graph(patch, 0.0))).mean() > 1


def test_generate_tile_upscales_then_controls(
    executor: Executor, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    small = tmp_path / "small.png"
    picture(32).save(small)
    tile = str(executor.folders.resolve("model_patches", TILE))
    common = ["--control-image", str(small), "--controlnet", tile]
    code, stderr = generate(executor, capsys, tmp_path / "t.png", *common, "--control-type", "tile")
    assert code == 0, stderr
    assert "Fun ControlNet Union 2.1" in stderr and Image.open(tmp_path / "t.png").size == (64, 64)
    code, stderr = generate(executor, capsys, tmp_path / "r.png", *common, "--control-type", "raw", "--width", "64",
                            "--height", "64")  # fmt: skip
    assert code == 0, stderr
    assert np.abs(pixels(tmp_path / "t.png") - pixels(tmp_path / "r.png")).mean() > 0  # Lanczos, not an area resize
    code, stderr = generate(executor, capsys, tmp_path / "x.png", *common, "--control-type", "depth")
    assert code == 2 and "canny, raw, tile" in stderr
