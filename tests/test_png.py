from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image

from tests.support.images import read_png_text
from zimage_serve.png import png_info, save_png


def test_parameters_and_comfy_chunks(tmp_path: Path) -> None:
    parameters = {
        "prompt": "一只猫",
        "negative_prompt": "",
        "steps": 8,
        "sampler": "euler",
        "guidance_scale": 0.0,
        "seed": 42,
        "width": 64,
        "height": 64,
        "model": "tiny",
    }
    prompt = {"3": {"class_type": "KSampler", "inputs": {"seed": 42}}}
    workflow = {"nodes": [], "links": [], "version": 0.4}
    path = save_png(
        Image.new("RGB", (64, 64), "red"),
        tmp_path / "a.png",
        png_info(parameters, prompt=prompt, extra_pnginfo={"workflow": workflow}),
    )
    text = read_png_text(path)
    assert text["parameters"].splitlines() == [
        "一只猫",
        "Steps: 8, Sampler: euler, CFG scale: 1.0, Seed: 42, Size: 64x64, Model: tiny",
    ]
    assert json.loads(text["zimage"]) == parameters
    assert json.loads(text["prompt"]) == prompt
    assert json.loads(text["workflow"]) == workflow


def test_no_workflow_chunks_without_a_workflow(tmp_path: Path) -> None:
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "b.png", png_info({"prompt": "x"}))
    assert set(read_png_text(path)) == {"parameters", "zimage"}


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "sub" / "c.png")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["c.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask, "output files follow the umask, not 0600"
