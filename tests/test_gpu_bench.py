"""The GPU benchmarks run end to end on the CPU with a tiny config (the GPU run is prepared here).

The scripts run in this process, as `python benchmarks/NAME.py ...` would run them: a process of their own
would spend most of the test importing torch and diffusers again."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(monkeypatch: pytest.MonkeyPatch, name: str, *arguments: str) -> None:
    script = ROOT / "benchmarks" / name
    monkeypatch.syspath_prepend(str(script.parent))
    monkeypatch.setattr(sys, "argv", [str(script), *arguments])
    runpy.run_path(str(script), run_name="__main__")


def test_gpu_bench_runs_tiny_on_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arguments = ["--tiny", "--size", "64", "--runs", "1", "--compile", "off", "--out", str(tmp_path)]
    run_script(monkeypatch, "gpu_bench.py", *arguments)
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    names = [row["name"] for row in report["rows"]]
    assert names[0] == "diffusers ZImagePipeline" and len(names) == 5
    assert names[2] == "engine, fast path without compile, FP8 text encoder"  # before anything compiles
    assert 0 < max(report["fp8_text_encoder_embedding_error"].values()) < 0.2  # FP8, close and in use
    for row in report["rows"]:
        assert row["transformer_calls"] == 8
        assert set(row["samples_s"]) == {"simple", "medium", "complex"}
        assert all(row["median_s"][stage] > 0 for stage in ("denoise", "decode", "total"))
    assert report["rows"][-1]["median_s"]["encode"] == 0  # the cached prompt skips the text encoder
    assert max(report["latent_relative_error"].values()) < 1e-4  # fp32 on the CPU: the same function
    assert "| diffusers ZImagePipeline |" in (tmp_path / "gpu_bench.md").read_text()
    assert (
        "FP8 text encoder, embeddings against bf16's, relative error: simple" in (tmp_path / "gpu_bench.md").read_text()
    )


def test_gpu_memory_modes_runs_tiny_on_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_script(monkeypatch, "gpu_memory_modes.py", "--tiny", "--size", "64", "--runs", "1", "--out", str(tmp_path))
    rows = {row["name"]: row for row in json.loads((tmp_path / "gpu_memory_modes.json").read_text())["rows"]}
    assert len(rows) == 7 and not any(row["failed"] for row in rows.values())
    assert all(row["large"].startswith("ran") for row in rows.values())
    assert 0 < rows["fp8_e4m3fn_fast, all on the GPU"]["relative_error"] < 0.1  # FP8 is close, and really in use
    smart = [row for name, row in rows.items() if name.endswith("smart")]
    # Smart memory moves weights, never changes the arithmetic: the image of all-on-the-device, exactly.
    assert len(smart) == 5 and all(row["relative_error"] == 0 for row in smart)
    # The fake 24 GB card holds everything; the smaller ones move weights in for each image.
    assert rows["24 GB card: bf16, smart"]["moved_per_image"] == 0
    assert all(row["moved_per_image"] > 0 for row in smart[1:])
    assert "| 8 GB card: fp8_e4m3fn_fast, smart |" in (tmp_path / "gpu_memory_modes.md").read_text()


def test_int8_matmul_runs_tiny_on_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_script(monkeypatch, "int8_matmul.py", "--tiny", "--runs", "1", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "int8_matmul.json").read_text())["rows"]
    assert [row["layer"] for row in rows] == ["qkv", "out", "w1/w3", "w2"]
    for row in rows:  # both INT8 forms are close to bf16, and W8A8's two roundings cost a little more
        assert 0 < row["dequantised_error"] < row["w8a8_error"] < 0.03
