"""object_info is generated from the node declarations in ComfyUI's exact shape."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from zimage_serve.workflow.folders import Folders
from zimage_serve.workflow.nodes import NODES
from zimage_serve.workflow.spec import MAX_SEED, object_info

REQUIRED_KEYS = {
    "input",
    "input_order",
    "output",
    "output_is_list",
    "output_name",
    "name",
    "display_name",
    "description",
    "python_module",
    "category",
    "output_node",
}


def test_every_node_has_comfyuis_fields(tmp_path: Path) -> None:
    info = object_info(NODES, Folders.default(tmp_path))
    assert set(info) >= {
        "UNETLoader",
        "CLIPLoader",
        "VAELoader",
        "CheckpointLoaderSimple",
        "LoraLoaderModelOnly",
        "LoraLoader",
        "CLIPTextEncode",
        "ConditioningZeroOut",
        "EmptySD3LatentImage",
        "EmptyLatentImage",
        "ModelSamplingAuraFlow",
        "KSampler",
        "KSamplerAdvanced",
        "VAEDecode",
        "VAEEncode",
        "LoadImage",
        "SaveImage",
        "PreviewImage",
    }
    for name, entry in info.items():
        assert set(entry) >= REQUIRED_KEYS, name
        assert entry["name"] == name
        assert len(entry["output"]) == len(entry["output_is_list"]) == len(entry["output_name"])
        for category, names in entry["input_order"].items():
            assert names == list(entry["input"][category])
        for spec in entry["input"]["required"].values():
            assert isinstance(spec, list) and len(spec) in (1, 2)


def test_ksampler_matches_comfyuis_declaration(tmp_path: Path) -> None:
    ksampler = object_info(NODES, Folders.default(tmp_path))["KSampler"]
    required = ksampler["input"]["required"]
    assert ksampler["input_order"]["required"] == [
        "model",
        "seed",
        "steps",
        "cfg",
        "sampler_name",
        "scheduler",
        "positive",
        "negative",
        "latent_image",
        "denoise",
    ]
    assert required["model"][0] == "MODEL"
    seed = required["seed"][1]
    assert (seed["default"], seed["min"], seed["max"], seed["control_after_generate"]) == (0, 0, MAX_SEED, True)
    assert MAX_SEED == 18446744073709551615
    assert {k: required["steps"][1][k] for k in ("default", "min", "max")} == {"default": 20, "min": 1, "max": 10000}
    assert {k: required["cfg"][1][k] for k in ("default", "min", "max", "step", "round")} == {
        "default": 8.0,
        "min": 0.0,
        "max": 100.0,
        "step": 0.1,
        "round": 0.01,
    }
    # ComfyUI's names for the samplers and schedulers that suit a flow model, in ComfyUI's order.
    assert required["sampler_name"][0] == [
        "euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "lcm", "deis",
        "res_multistep", "ddim", "uni_pc",
    ]  # fmt: skip
    assert required["scheduler"][0] == [
        "simple", "sgm_uniform", "karras", "exponential", "beta", "normal", "linear_quadratic", "kl_optimal"
    ]  # fmt: skip
    assert ksampler["output"] == ["LATENT"] and ksampler["output_node"] is False
    assert ksampler["category"] == "sampling" and ksampler["python_module"] == "nodes"


def test_save_image_declares_its_hidden_inputs(tmp_path: Path) -> None:
    save = object_info(NODES, Folders.default(tmp_path))["SaveImage"]
    assert save["output_node"] is True and save["output"] == []
    assert save["input"]["hidden"] == {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
    assert save["input_order"]["hidden"] == ["prompt", "extra_pnginfo"]
    assert save["input"]["required"]["filename_prefix"][1]["default"] == "ComfyUI"


def test_file_lists_are_read_when_asked(tmp_path: Path) -> None:
    models = tmp_path / "models"
    folders = Folders.default(tmp_path / "data", [models])
    loader = object_info(NODES, folders)["UNETLoader"]
    assert loader["input"]["required"]["unet_name"][0] == ["zimage-nano"]  # the built-in model, always there
    (models / "diffusion_models" / "sub").mkdir(parents=True)
    (models / "unet").mkdir()
    (models / "diffusion_models" / "sub" / "a.safetensors").write_bytes(b"")
    (models / "unet" / "b.safetensors").write_bytes(b"")
    (models / "diffusion_models" / "notes.txt").write_text("not a model")
    (models / "loras").mkdir()
    (models / "loras" / "style.safetensors").write_bytes(b"")
    info = object_info(NODES, folders)
    assert info["UNETLoader"]["input"]["required"]["unet_name"][0] == [
        "zimage-nano",
        "sub/a.safetensors",
        "b.safetensors",
    ]
    assert info["LoraLoaderModelOnly"]["input"]["required"]["lora_name"][0] == ["style.safetensors"]
    assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == ["zimage-nano"]
    folders.input.mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(folders.input / "photo.png")
    (folders.input / "readme.txt").write_text("x")
    image = object_info(NODES, folders)["LoadImage"]["input"]["required"]["image"]
    assert image == [["photo.png"], {"image_upload": True}]
