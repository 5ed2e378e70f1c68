#!/usr/bin/env bash
# The prepared GPU run: the INT8 layers, then the engine and memory-mode benchmarks, results under $OUT
# (or ./gpu-results).
# On the lent GPU machine (which has torch and transformers but not diffusers), carry the wheels:
#   here:  pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#            --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
#   there: run with carry [".whl"], command "bash benchmarks/gpu_run.sh", timeout_s 580.
# Each benchmark saves its table after every row, so one stopped by its time limit keeps what it measured.
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.limit --format=csv | tee "$out/nvidia-smi.csv"
python3 -c 'import torch, transformers, diffusers; print("torch", torch.__version__, "cuda", torch.version.cuda,
    "cudnn", torch.backends.cudnn.version(), "transformers", transformers.__version__, "diffusers", diffusers.__version__)' \
    2>&1 | tee "$out/versions.txt"
timeout 60 python3 benchmarks/int8_matmul.py --out "$out" 2>&1 | tee "$out/int8_matmul.log"
timeout 285 python3 benchmarks/gpu_bench.py --runs 3 --out "$out" 2>&1 | tee "$out/gpu_bench.log"
timeout 265 python3 benchmarks/gpu_memory_modes.py --runs 1 --out "$out" 2>&1 | tee "$out/gpu_memory_modes.log"
