"""One loader, three layouts, and every way a checkpoint can be wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.checkpoints import comfy_transformer, copy_tokenizer, diffusers_state, write_comfy_root
from zimage_serve.engine import GenerationParams, open_engine
from zimage_serve.engine.layouts import find_tokenizer, resolve
from zimage_serve.engine.loader import prepare_all
from zimage_serve.errors import ModelLoadError

PARAMS = GenerationParams("a yellow triangle on a green background", seed=123, width=64, height=64)
TRANSFORMER = "diffusion_models/z_image_turbo_bf16.safetensors"


def image(model: Path, **kwargs: object) -> np.ndarray:
    return np.asarray(open_engine(model, device="cpu", **kwargs).generate(PARAMS).images[0])  # type: ignore[arg-type]


@pytest.fixture
def root_copy(comfy_root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(comfy_root, tmp_path / "models"))


def test_three_layouts_give_identical_images(tiny_model: Path, comfy_root: Path) -> None:
    reference = image(tiny_model)
    split = image(comfy_root / TRANSFORMER, tokenizer=tiny_model)
    root = image(comfy_root, tokenizer=tiny_model)
    assert reference.std() > 1
    assert np.array_equal(reference, split)
    assert np.array_equal(reference, root)


def test_comfy_prefixed_keys_load_the_same(tiny_model: Path, tmp_path: Path) -> None:
    root = write_comfy_root(tiny_model, tmp_path / "prefixed", prefix="model.diffusion_model.")
    assert np.array_equal(image(tiny_model), image(root, tokenizer=tiny_model))


def test_split_files_named_explicitly(tiny_model: Path, comfy_root: Path, tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir()
    for name in (TRANSFORMER, "text_encoders/qwen_3_4b.safetensors", "vae/ae.safetensors"):
        shutil.copy(comfy_root / name, loose / Path(name).name)
    model = image(
        loose / "z_image_turbo_bf16.safetensors",
        text_encoder=loose / "qwen_3_4b.safetensors",
        vae=loose / "ae.safetensors",
        tokenizer=tiny_model / "tokenizer",
    )
    assert np.array_equal(image(tiny_model), model)


def test_layouts_are_recognised(tiny_model: Path, comfy_root: Path) -> None:
    assert resolve(tiny_model, tokenizer=tiny_model).layout == "diffusers folder"
    assert resolve(comfy_root, tokenizer=tiny_model).layout == "ComfyUI models folder"
    assert resolve(comfy_root / TRANSFORMER, tokenizer=tiny_model).layout == "ComfyUI split files"
    sources = resolve(tiny_model)
    assert sources.transformer.weights.name.endswith(".safetensors.index.json"), "fixture should be sharded"


def test_root_finds_files_by_content_when_names_differ(tiny_model: Path, root_copy: Path) -> None:
    (root_copy / TRANSFORMER).rename(root_copy / "diffusion_models" / "my_finetune.safetensors")
    (root_copy / "vae" / "ae.safetensors").rename(root_copy / "vae" / "flux_vae.safetensors")
    sources = resolve(root_copy, tokenizer=tiny_model)
    assert sources.transformer.weights.name == "my_finetune.safetensors"
    assert sources.vae.weights.name == "flux_vae.safetensors"


def test_tokenizer_next_to_text_encoder_is_found(tiny_model: Path, root_copy: Path) -> None:
    copy_tokenizer(tiny_model, root_copy / "text_encoders" / "qwen_3_4b_tokenizer")
    assert resolve(root_copy).tokenizer == root_copy / "text_encoders" / "qwen_3_4b_tokenizer"


def test_tokenizer_from_environment(tiny_model: Path, comfy_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZIMAGE_TOKENIZER", str(tiny_model))
    assert resolve(comfy_root).tokenizer == tiny_model / "tokenizer"


def test_missing_tokenizer_says_what_was_tried(comfy_root: Path) -> None:
    with pytest.raises(ModelLoadError) as caught:
        resolve(comfy_root)
    message = str(caught.value)
    assert "no Qwen3 tokenizer found" in message
    assert "qwen_3_4b_tokenizer" in message and "Hugging Face hub" in message and "--tokenizer" in message


def test_tokenizer_too_big_for_text_encoder(tiny_model: Path, comfy_root: Path, tmp_path: Path) -> None:
    from zimage_serve.nano.tokenizer import train_tokenizer

    big = train_tokenizer([f"word{i} 词{i}" for i in range(3000)], 2000)
    big.save_pretrained(tmp_path / "big_tokenizer")
    with pytest.raises(ModelLoadError, match="text encoder only embeds"):
        open_engine(comfy_root, tokenizer=tmp_path / "big_tokenizer", device="cpu")


# ---- bad checkpoints ----------------------------------------------------------------------------


def rewrite(path: Path, change: object) -> None:
    state = load_file(path)
    change(state)  # type: ignore[operator]
    save_file(state, path)


def expect_error(model: Path, *fragments: str, tokenizer: Path | None = None) -> str:
    with pytest.raises(ModelLoadError) as caught:
        prepare_all(resolve(model, tokenizer=tokenizer))
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_transformer_file(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        resolve(tmp_path / "nope.safetensors")


def test_truncated_safetensors_names_the_file(tiny_model: Path, root_copy: Path) -> None:
    path = root_copy / TRANSFORMER
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    expect_error(root_copy / TRANSFORMER, str(path), "truncated or corrupt", tokenizer=tiny_model)


def test_corrupt_header_names_the_file(tiny_model: Path, root_copy: Path) -> None:
    path = root_copy / "vae" / "ae.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    expect_error(root_copy / TRANSFORMER, "ae.safetensors", "not a valid safetensors file", tokenizer=tiny_model)


def test_wrong_tensor_shape_is_named(tiny_model: Path, root_copy: Path) -> None:
    def shrink(state: dict[str, torch.Tensor]) -> None:
        state["layers.1.feed_forward.w2.weight"] = state["layers.1.feed_forward.w2.weight"][:, :-1].contiguous()

    rewrite(root_copy / TRANSFORMER, shrink)
    expect_error(root_copy / TRANSFORMER, "wrong shape", "layers.1.feed_forward.w2.weight", tokenizer=tiny_model)


def test_missing_key_is_named(tiny_model: Path, root_copy: Path) -> None:
    rewrite(root_copy / TRANSFORMER, lambda s: s.pop("layers.1.attention.qkv.weight"))
    expect_error(
        root_copy / TRANSFORMER,
        "3 missing tensors",
        "layers.1.attention.to_q.weight",
        "layers.1.attention.to_v.weight",
        tokenizer=tiny_model,
    )


def test_missing_key_needed_for_the_config_is_named(tiny_model: Path, root_copy: Path) -> None:
    rewrite(root_copy / TRANSFORMER, lambda s: s.pop("cap_embedder.1.weight"))
    expect_error(
        root_copy / TRANSFORMER, "z_image_turbo_bf16.safetensors", "cap_embedder.1.weight", tokenizer=tiny_model
    )


def test_unknown_key_is_named(tiny_model: Path, root_copy: Path) -> None:
    rewrite(root_copy / TRANSFORMER, lambda s: s.update({"layers.0.mystery.weight": torch.zeros(2)}))
    expect_error(root_copy / TRANSFORMER, "unknown tensors", "layers.0.mystery.weight", tokenizer=tiny_model)


def test_unknown_vae_key_left_over_is_named(tiny_model: Path, root_copy: Path) -> None:
    # diffusers' VAE converter drops names it does not know; the loader must still notice them.
    rewrite(root_copy / "vae" / "ae.safetensors", lambda s: s.update({"decoder.extra.weight": torch.zeros(2)}))
    expect_error(
        root_copy / TRANSFORMER, "ae.safetensors", "no vae weight uses", "decoder.extra.weight", tokenizer=tiny_model
    )


def test_missing_text_encoder_layer_is_named(tiny_model: Path, root_copy: Path) -> None:
    path = root_copy / "text_encoders" / "qwen_3_4b.safetensors"
    rewrite(path, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    expect_error(root_copy, "qwen_3_4b.safetensors", "layers.1.mlp.up_proj.weight", tokenizer=tiny_model)


def test_wrong_component_in_a_slot(tiny_model: Path, comfy_root: Path) -> None:
    with pytest.raises(ModelLoadError, match="expected a text encoder but this is a vae"):
        resolve(comfy_root / TRANSFORMER, text_encoder=comfy_root / "vae" / "ae.safetensors", tokenizer=tiny_model)


def test_mismatched_text_encoder_width(tiny_model: Path, root_copy: Path) -> None:
    def widen(state: dict[str, torch.Tensor]) -> None:
        # A diffusion model made for 64-wide text features: the caption norm and projection input grow.
        for key in ("cap_embedder.0.weight", "cap_embedder.1.weight"):
            state[key] = torch.cat([state[key], state[key]], dim=-1)

    rewrite(root_copy / TRANSFORMER, widen)
    expect_error(root_copy, "qwen_3_4b.safetensors", "expects 64", tokenizer=tiny_model)


def test_shard_listed_in_index_but_missing(tiny_model: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    shard = sorted((copy / "transformer").glob("diffusion_pytorch_model-*.safetensors"))[0]
    shard.unlink()
    expect_error(copy, str(shard), "file not found")


def test_missing_config_names_the_file(tiny_model: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    (copy / "vae" / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"vae/config.json: file not found"):
        resolve(copy)


def test_broken_model_index(tiny_model: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    (copy / "model_index.json").write_text("{broken")
    with pytest.raises(ModelLoadError, match=r"model_index\.json: not valid JSON"):
        resolve(copy)


def test_bad_native_size_in_model_index(tiny_model: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    index = json.loads((copy / "model_index.json").read_text())
    index["_zimage_serve"] = {"native_size": 100}
    (copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="native_size"):
        resolve(copy)


def test_not_a_model_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a model"):
        resolve(tmp_path)


def test_pickle_checkpoints_are_refused(tiny_model: Path, comfy_root: Path, tmp_path: Path) -> None:
    pickle = tmp_path / "qwen.ckpt"
    pickle.write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match=r"only \.safetensors"):
        resolve(comfy_root / TRANSFORMER, text_encoder=pickle, tokenizer=tiny_model)


def test_comfy_fixture_really_uses_comfy_names(comfy_root: Path, tiny_model: Path) -> None:
    keys = load_file(comfy_root / TRANSFORMER).keys()
    assert "layers.0.attention.qkv.weight" in keys and "x_embedder.weight" in keys
    assert not any("to_q" in k for k in keys)
    assert len(keys) < len(diffusers_state(tiny_model / "transformer"))
    vae_keys = load_file(comfy_root / "vae" / "ae.safetensors").keys()
    assert "decoder.up.0.block.0.conv1.weight" in vae_keys and "encoder.mid.attn_1.q.weight" in vae_keys
    assert comfy_transformer({}) == {}


def test_find_tokenizer_accepts_diffusers_folder(tiny_model: Path) -> None:
    assert find_tokenizer(tiny_model) == tiny_model / "tokenizer"
