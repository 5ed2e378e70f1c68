"""Loading is memory-mapped and goes straight to the target dtype: no fp32 detour for bf16 weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from diffusers import ZImageTransformer2DModel
from safetensors.torch import save_file

from tests.checkpoints import comfy_transformer
from zimage_serve.nano.random_model import TinyConfig, transformer_config

MEASURE = """
import json, sys, torch
from pathlib import Path
from zimage_serve.engine import components
from zimage_serve.engine.components import ComponentSource

def status(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

prepared = components.prepare(ComponentSource('transformer', Path(sys.argv[1])))
before = status('VmRSS')
open('/proc/self/clear_refs', 'w').write('5')  # restart the peak (VmHWM) from here
model = components.load(prepared, torch.device('cpu'), getattr(torch, sys.argv[2]))
with torch.no_grad():  # touch every weight so every page is really resident
    checksum = sum(float(p.float().sum()) for p in model.parameters())
dtypes = sorted({str(p.dtype) for p in model.parameters()})
print(json.dumps({'before': before, 'peak': status('VmHWM'), 'dtypes': dtypes}))
"""


def measure(path: Path, dtype: str) -> dict[str, int | list[str]]:
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path), dtype], capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_bf16_checkpoint_loads_in_about_its_own_size(tmp_path: Path) -> None:
    tiny = TinyConfig(
        transformer={
            "dim": 768,
            "n_layers": 8,
            "n_refiner_layers": 1,
            "n_heads": 6,
            "n_kv_heads": 6,
            "cap_feat_dim": 64,
        }
    )
    model = ZImageTransformer2DModel.from_config(transformer_config(tiny)).to(torch.bfloat16)
    path = tmp_path / "big_bf16.safetensors"
    save_file(comfy_transformer({k: v.contiguous() for k, v in model.state_dict().items()}), path)
    del model
    size = path.stat().st_size
    assert size > 100 * 1024**2, "too small to measure against the interpreter's own memory"

    bf16 = measure(path, "bfloat16")
    assert bf16["dtypes"] == ["torch.bfloat16"]
    growth = int(bf16["peak"]) - int(bf16["before"])  # type: ignore[call-overload]
    # One copy of the weights plus one tensor's worth of slack; an fp32 detour would need 3x.
    assert growth < 1.4 * size, f"peak grew {growth / size:.2f}x the checkpoint size"
