#!/usr/bin/env bash
# The prepared GPU run, results under $OUT (or ./gpu-results): smart memory on the capped "cards" first
# (gpu_memory_modes.py), then the engine's speed (gpu_bench.py) and the INT8 layers (int8_matmul.py), each
# under a time limit: the whole run takes at most 430 s, so a session's 15 minutes of device time leave
# room to start the machine and run the memory part again.
#   bash benchmarks/gpu_run.sh           # on the lent GPU machine
#   bash benchmarks/gpu_run.sh --tiny    # the same scripts here, on the CPU, with a tiny config
# On the GPU machine (which has torch and transformers but not diffusers), carry the wheels:
#   here:  pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#            --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
#   there: run with carry [".whl"], command "bash benchmarks/gpu_run.sh", timeout_s 450.
# Each benchmark saves its table after every row, so one stopped by its time limit keeps what it measured.
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
tiny=()
python=python3
if [[ "${1:-}" == "--tiny" ]]; then
    tiny=(--tiny --size 64 --runs 1 --device cpu)
    [[ -x .venv/bin/python ]] && python=.venv/bin/python
fi
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [[ ${#tiny[@]} -eq 0 ]]; then
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.limit --format=csv | tee "$out/nvidia-smi.csv"
fi
"$python" -c 'import torch, transformers, diffusers; print("torch", torch.__version__, "cuda", torch.version.cuda,
    "transformers", transformers.__version__, "diffusers", diffusers.__version__)' 2>&1 | tee "$out/versions.txt"
status=0
timeout 240 "$python" benchmarks/gpu_memory_modes.py "${tiny[@]}" --out "$out" 2>&1 | tee "$out/gpu_memory_modes.log" \
    || status=1
bench=(--runs 2)
[[ ${#tiny[@]} -gt 0 ]] && bench=("${tiny[@]}" --compile off)
timeout 150 "$python" benchmarks/gpu_bench.py "${bench[@]}" --out "$out" 2>&1 | tee "$out/gpu_bench.log" || status=1
int8=()
[[ ${#tiny[@]} -gt 0 ]] && int8=(--tiny --runs 1)
timeout 40 "$python" benchmarks/int8_matmul.py "${int8[@]}" --out "$out" 2>&1 | tee "$out/int8_matmul.log" || status=1
exit $status
