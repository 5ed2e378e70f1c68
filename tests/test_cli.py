"""The `zimage` command: in-process for the many cases, as a real process for the console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.cli import run
from tests.support.images import read_png_text
from zimage_serve.nano.checker import read

TRANSFORMER = "diffusion_models/z_image_turbo_bf16.safetensors"


def test_a_size_the_built_in_model_never_saw_is_warned_about(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "big.png"
    args = ["generate", "一个红色的圆形", "-o", str(out), "--width", "256", "--height", "192", "--steps", "1"]
    code, _, stderr = run(args, capsys)
    assert code == 0 and out.is_file(), stderr
    assert "warning: zimage-nano was trained at 128×128 only; at 256×192 it draws a pattern" in stderr
    code, _, stderr = run([*args[:4], "--steps", "1"], capsys)
    assert code == 0 and "trained at" not in stderr


def test_generate_writes_png_with_parameters(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cat.png"
    code, stdout, stderr = run(
        [
            "generate",
            "一只猫",
            "-o",
            str(out),
            "--seed",
            "5",
            "--width",
            "96",
            "--height",
            "64",
            "--steps",
            "4",
            "--model",
            str(tiny_model),
        ],
        capsys,
    )
    assert code == 0, stderr
    assert stdout.strip() == str(out)
    assert "device cpu" in stderr and "memory mode" in stderr
    assert Image.open(out).size == (96, 64)
    meta = json.loads(read_png_text(out)["zimage"])
    assert (meta["prompt"], meta["seed"], meta["steps"], meta["width"]) == ("一只猫", 5, 4, 96)


def test_generate_batch_writes_one_file_per_seed(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "b.png"
    code, stdout, _ = run(
        [
            "generate",
            "x",
            "-o",
            str(out),
            "--seed",
            "10",
            "-n",
            "2",
            "--width",
            "64",
            "--height",
            "64",
            "--model",
            str(tiny_model),
        ],
        capsys,
    )
    assert code == 0
    files = [Path(line) for line in stdout.split()]
    assert [f.name for f in files] == ["b_00.png", "b_01.png"]
    seeds = [json.loads(read_png_text(f)["zimage"])["seed"] for f in files]
    assert seeds == [10, 11]


def test_guidance_and_negative(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--seed", "1", "--width", "64", "--height", "64", "--model", str(tiny_model)]
    assert run(["generate", "x", "-o", str(tmp_path / "a.png"), *common], capsys)[0] == 0
    assert (
        run(["generate", "x", "-o", str(tmp_path / "b.png"), "--guidance", "2", "--negative", "blur", *common], capsys)[
            0
        ]
        == 0
    )
    a, b = (np.asarray(Image.open(tmp_path / n)) for n in ("a.png", "b.png"))
    assert not np.array_equal(a, b)
    assert "Negative prompt: blur" in read_png_text(tmp_path / "b.png")["parameters"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["generate", "", "--model", "{model}"], "prompt: must be a non-empty text"),
        (["generate", "x", "--width", "100", "--model", "{model}"], "width: 100 is not a multiple of 16"),
        (["generate", "x", "--height", "4112", "--model", "{model}"], "height: 4112 is more than 4096"),
        (["generate", "x", "--steps", "0", "--model", "{model}"], "steps: 0 is outside"),
        (["generate", "x", "--model", "{tmp}/missing"], "missing: no such file or folder"),
        (["generate", "x", "--model", "{root}"], "no Qwen3 tokenizer found"),
        (
            [
                "generate",
                "x",
                "--model",
                "{root}/" + TRANSFORMER,
                "--text-encoder",
                "{tmp}/te.safetensors",
                "--tokenizer",
                "{model}",
            ],
            "te.safetensors: file not found",
        ),
        (["generate", "x", "--model", "{model}", "--device", "cuda"], "CUDA"),
        (["generate", "x", "--model", "{model}", "--memory-mode", "smart"], "memory_mode"),
        (["generate", "x", "--model", "{model}", "--dtype", "int4"], "dtype"),
        (["generate", "x", "--model", "{model}", "-o", "{tmp}/out.jpg"], "must end in .png"),
        (["generate", "x", "--model", "{model}", "--attention", "fastest"], "--attention: 'fastest' is not auto"),
        (["generate", "x", "--model", "{model}", "--attention", "flash"], "backend 'flash' is not available on cpu"),
        (["generate", "x", "--model", "{model}", "--compile", "maybe"], "--compile: 'maybe' is not one of"),
        (["generate", "x", "--model", "{model}", "--weight-dtype", "int4"], "--weight-dtype: 'int4' is not one of"),
        (["run", "w.json", "--attention", "_native_cudnn"], "backend '_native_cudnn' is not available"),
        (["serve", "--attention", "flash"], "backend 'flash' is not available on cpu"),
        (["serve", "--compile", "sometimes"], "--compile: 'sometimes'"),
        (["serve", "--memory-mode", "smart"], "--memory-mode: smart keeps weights in host memory for a CUDA GPU"),
        (["serve", "--memory-mode", "model"], "--memory-mode: smart keeps weights in host memory for a CUDA GPU"),
        (["serve", "--memory-mode", "half"], "--memory-mode: 'half' is not one of"),
        (["serve", "--data-dir", "{tmp}/d", "--output-store", "gs://shop"], "--output-store"),
        (["serve", "--data-dir", "{tmp}/d", "--output-store", "s3://Shop_Images"], "bucket name"),
        (["serve", "--data-dir", "{tmp}/d", "--output-store", "s3://shop", "--output-url-lifetime", "0"], "lifetime"),
    ],
)
def test_bad_input_is_a_clear_error(
    args: list[str],
    fragment: str,
    tiny_model: Path,
    comfy_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ZIMAGE_TOKENIZER", raising=False)
    filled = [a.format(model=tiny_model, root=comfy_root, tmp=tmp_path) for a in args]
    code, stdout, stderr = run(filled, capsys)
    assert code != 0
    assert fragment in stderr.replace("\n", " ") or fragment in stdout
    assert "Traceback" not in stderr + stdout


def test_corrupt_checkpoint_via_cli(
    comfy_root: Path, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes((comfy_root / TRANSFORMER).read_bytes()[:1000])
    code, _, stderr = run(["generate", "x", "--model", str(broken), "--tokenizer", str(tiny_model)], capsys)
    assert code == 1
    assert "broken.safetensors" in stderr and "Traceback" not in stderr


def test_models_lists_layouts_and_problems(
    tiny_model: Path, comfy_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = comfy_root.parent / "junk"
    (junk / "vae").mkdir(parents=True)
    (junk / "vae" / "broken.safetensors").write_bytes(b"garbage")
    code, stdout, _ = run(
        ["models", str(tiny_model), str(comfy_root), str(junk), "--tokenizer", str(tiny_model)], capsys
    )
    assert code == 0
    flat = " ".join(stdout.split())
    assert "diffusers folder (complete model)" in flat
    assert "ComfyUI models folder (complete model)" in flat
    assert flat.count("usable") >= 5
    assert "not a valid safetensors file" in flat


def test_models_explains_missing_tokenizer(comfy_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, _ = run(["models", str(comfy_root)], capsys)
    assert code == 0
    assert "no Qwen3 tokenizer found" in " ".join(stdout.split())


def test_info(capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, _ = run(["info"], capsys)
    assert code == 0
    for word in ("device (auto)", "torch", "diffusers", "transformers", "RAM"):
        assert word in stdout


def test_console_script_default_model_end_to_end(tmp_path: Path) -> None:
    """A real process, as a user runs it: no model configured, so the built-in zimage-nano draws it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("ZIMAGE_MODEL", None)
    zimage = Path(sys.executable).parent / "zimage"
    done = subprocess.run(
        [str(zimage), "generate", "一个红色的圆形在蓝色背景上", "-o", str(tmp_path / "s.png"), "--seed", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "zimage-nano" in done.stderr
    image = Image.open(tmp_path / "s.png")
    assert image.size == (128, 128)
    reading = read(image)
    assert (reading.background, reading.colour, reading.shape) == ("blue", "red", "circle")
    bad = subprocess.run(
        [str(zimage), "generate", "x", "--width", "17"], env=env, capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 1
    assert "width: 17" in bad.stderr and "Traceback" not in bad.stderr


HEAVY = (
    "{'torch', 'diffusers', 'transformers', 'PIL', 'numpy', 'fastapi', 'uvicorn', 'starlette', 'pydantic_settings', "
    "'safetensors'}"
)


@pytest.mark.parametrize(
    "args",
    [[], ["--help"], ["batch", "--help"], ["templates", "list"], ["tokens", "list"], ["audit", "verify"]],
    ids=lambda args: " ".join(["zimage", *args]),
)
def test_light_commands_import_no_heavy_library(args: list[str], tmp_path: Path) -> None:
    """`zimage --help`, `zimage batch --help`, `zimage templates list`, `zimage tokens ...` and `zimage audit
    ...` start in a fraction of a second: the command line loads torch, diffusers, the node set (PIL,
    numpy), the web server and pydantic-settings only in the commands that use them."""
    code = (
        "import sys\nfrom zimage_serve.cli import app\n"
        f"try:\n    app(args={args!r})\nexcept SystemExit:\n    pass\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {HEAVY}))"
    )
    env = {**os.environ, "ZIMAGE_DATA_DIR": str(tmp_path / "data")}
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert found.stdout.strip().splitlines()[-1] == "[]", found.stdout + found.stderr
