"""Loading is memory-mapped and goes straight to the target dtype: no fp32 detour for bf16 weights. A worker
holds the model libraries only once a job needs a model."""

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


LIBRARIES = """
import json, sys, tempfile
from pathlib import Path
from zimage_serve.worker.build import RunSettings, WorkerConfig, build_executor
from zimage_serve.workflow.nodes import NODES
from zimage_serve.workflow.validate import Validator

MODEL_LIBRARIES = ("diffusers", "transformers", "scipy", "torchvision")
data = Path(tempfile.mkdtemp())
executor = build_executor(WorkerConfig([data / "models"], data / "in", data / "out", data / "temp", RunSettings("cpu")))
seen = {"built": [m for m in MODEL_LIBRARIES if m in sys.modules]}
graph = json.loads(sys.argv[1])
for name, prompt in graph.items():
    checked = Validator(NODES, executor.folders).validate(prompt)
    assert executor.run(name, checked.prompt, checked.outputs).ok, name
    seen[name] = [m for m in MODEL_LIBRARIES if m in sys.modules]
print(json.dumps(seen))
"""


def test_a_worker_imports_the_model_libraries_with_its_first_model_not_before(tmp_path: Path) -> None:
    """In a fresh interpreter, as a worker process starts: an executor built and a model-free prompt run hold
    none of diffusers and transformers (nor scipy and torchvision, which they pull in); the nano prompt
    brings them."""
    from tests.workflows import nano_prompt

    model_free = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "plain"}},
    }
    nano = nano_prompt()
    nano["13"]["inputs"].update(width=64, height=64)
    nano["3"]["inputs"]["steps"] = 1
    graphs = json.dumps({"model_free": model_free, "nano": nano})
    run = subprocess.run([sys.executable, "-c", LIBRARIES, graphs], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["built"] == [] and seen["model_free"] == [], seen
    assert {"diffusers", "transformers"} <= set(seen["nano"]), seen
