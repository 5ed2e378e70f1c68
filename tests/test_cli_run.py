"""`zimage run`: workflows from the command line, with --set, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.cli import run
from tests.support.images import read_png_text
from tests.workflows import NANO_WORKFLOW, TEMPLATES
from zimage_serve.nano.checker import read


def test_run_the_nano_workflow_with_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, stdout, stderr = run(
        [
            "run",
            str(NANO_WORKFLOW),
            "--output-dir",
            str(out),
            "--set",
            "6.text=a yellow square on a white background",
            "--set",
            "3.seed=3",
            "-s",
            "9.filename_prefix=shapes/yellow",
        ],
        capsys,
    )
    assert code == 0, stderr
    path = Path(stdout.strip())
    assert path == out / "shapes" / "yellow_00001_.png" and path.is_file()
    reading = read(Image.open(path))
    assert (reading.background, reading.colour) == ("white", "yellow")
    prompt = json.loads(read_png_text(path)["prompt"])
    assert prompt["3"]["inputs"]["seed"] == 3 and "workflow" not in read_png_text(path)


def test_run_a_ui_format_workflow_embeds_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.checkpoints import copy_tokenizer, write_comfy_root

    models = write_comfy_root(tiny_model, tmp_path / "models")
    copy_tokenizer(tiny_model, models / "text_encoders" / "qwen_3_4b_tokenizer")
    workflow = json.loads((TEMPLATES / "image_z_image_turbo.subgraph.json").read_text())
    for node in workflow["definitions"]["subgraphs"][0]["nodes"]:
        if node["type"] == "EmptySD3LatentImage":
            node["widgets_values"][:2] = [64, 64]
    path = tmp_path / "ui.json"
    path.write_text(json.dumps(workflow))
    monkeypatch.setenv("ZIMAGE_MODELS", str(models))
    code, stdout, stderr = run(["run", str(path), "--output-dir", str(tmp_path / "o"), "--set", "57:3.steps=2"], capsys)
    assert code == 0, stderr
    written = Path(stdout.strip())
    assert Image.open(written).size == (64, 64)
    assert json.loads(read_png_text(written)["workflow"])["nodes"][0]["type"] == "MarkdownNote"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "6.txt=hi"], "node 6 (CLIPTextEncode) has no input 'txt'"),
        (["--set", "77.seed=1"], "the workflow has no node 77"),
        (["--set", "seed=1"], "NODE_ID.INPUT=VALUE"),
        (["--set", "3.steps=0"], "node 3 (KSampler): Value 0 smaller than min of 1: steps"),
        (["--set", "28.unet_name=flux.safetensors"], "unet_name: 'flux.safetensors' not in ['zimage-nano']"),
        (["--models", "/no/such/folder"], "/no/such/folder is not a folder"),
    ],
)
def test_bad_input_is_a_clear_error(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, stderr = run(["run", str(NANO_WORKFLOW), "--output-dir", str(tmp_path), *args], capsys)
    assert code in (1, 2)
    assert message in " ".join(stderr.split())
    assert "Traceback" not in stderr
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize(("content", "message"), [("{", "not a JSON workflow"), ("[1, 2]", "not a ComfyUI workflow")])
def test_a_file_that_is_not_a_workflow(
    content: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "w.json"
    path.write_text(content)
    code, _, stderr = run(["run", str(path)], capsys)
    assert code == 1 and message in stderr
    code, _, stderr = run(["run", str(tmp_path / "missing.json")], capsys)
    assert code == 1 and "file not found" in stderr


@pytest.mark.parametrize(("guidance", "negative"), [("0", ""), ("3", "a red circle")])
def test_generate_and_a_workflow_share_one_sampling_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], guidance: str, negative: str
) -> None:
    """The same seed, steps, shift and guidance give the same image through `zimage generate` and through
    the workflow executor: one implementation of noise, sampling, CFG and decoding (8 steps: generate's
    schedule and ComfyUI's "simple" one coincide when 1000 / steps is whole). cfg = guidance + 1."""
    prompt = "a green triangle on a white background"
    made = tmp_path / "generate.png"
    code, _, stderr = run(
        ["generate", prompt, "-o", str(made), "--seed", "11", "--guidance", guidance, "--negative", negative], capsys
    )
    assert code == 0, stderr
    workflow = json.loads(NANO_WORKFLOW.read_text(encoding="utf-8"))
    workflow["7"] = {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["30", 0]}}
    workflow["3"]["inputs"].update(negative=["7", 0], cfg=float(guidance) + 1, seed=11)
    workflow["6"]["inputs"]["text"] = prompt
    (tmp_path / "flow.json").write_text(json.dumps(workflow), encoding="utf-8")
    code, stdout, stderr = run(["run", str(tmp_path / "flow.json"), "--output-dir", str(tmp_path / "out")], capsys)
    assert code == 0, stderr
    ran = np.asarray(Image.open(stdout.strip()).convert("RGB"), dtype=np.int16)
    generated = np.asarray(Image.open(made).convert("RGB"), dtype=np.int16)
    assert np.abs(ran - generated).max() <= 1  # the same image, to the rounding of one 8-bit step
