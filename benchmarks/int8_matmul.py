"""INT8 ConvRot layers (ComfyUI's W8A8) against the bf16 layers they were made from, side by side in one run.

    .venv/bin/python benchmarks/int8_matmul.py [--tokens 4128] [--runs 20] [--tiny] [--out DIR]

For each of Z-Image-Turbo's quantised projection shapes (the fused qkv, the attention's out, the
feed-forward's w1/w3 and w2, with 1024²'s 4,096 image tokens and a 32-token caption), it times one forward
of: the bf16 `nn.Linear`, the `Int8Linear` (rotate, quantise the activations per row, int8 matmul, both
scales), and the layer dequantised at load (what `--int8-matmul off` runs); and the output error of the
two INT8 forms against bf16. On the CPU (`--tiny`: small shapes) it checks the path runs; the numbers that
matter come from a GPU (`benchmarks/gpu_run.sh`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from zimage_serve.engine.comfy_quant import Int8Linear, QuantConf, dequantise, quantise_int8

# (name, out features, in features) of Turbo's quantised projections (dim 3840, feed-forward 10240)
SHAPES = [("qkv", 11520, 3840), ("out", 3840, 3840), ("w1/w3", 10240, 3840), ("w2", 3840, 10240)]
TINY = [("qkv", 192, 64), ("out", 64, 64), ("w1/w3", 256, 64), ("w2", 64, 256)]


def timed(run: object, device: torch.device, runs: int) -> float:
    """Median milliseconds of one call, after two warm-up calls."""
    times = []
    for index in range(runs + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        run()  # type: ignore[operator]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index >= 2:
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096 + 32)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--group", type=int, default=256)
    parser.add_argument("--tiny", action="store_true", help="small shapes, for a check on the CPU")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes, group = (TINY, 16) if args.tiny else (SHAPES, args.group)
    tokens = 64 if args.tiny else args.tokens
    generator = torch.Generator().manual_seed(0)
    rows = []
    print(f"{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), {tokens} tokens")
    header = ("layer", "bf16 ms", "W8A8 ms", "dequant ms", "W8A8 vs bf16", "err W8A8", "err deq")
    print("{:8} {:>9} {:>9} {:>11} {:>13} {:>9} {:>8}".format(*header))
    for name, out_features, in_features in shapes:
        weight = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
        codes, scale = quantise_int8(weight, group)
        conf = QuantConf("int8_tensorwise", True, group)
        linear = torch.nn.Linear(in_features, out_features, bias=False).to(device, dtype)
        with torch.no_grad():
            linear.weight.copy_(weight.to(dtype))
        int8 = Int8Linear(codes.to(device), scale.to(device), None, conf)
        dequantised = torch.nn.Linear(in_features, out_features, bias=False).to(device, dtype)
        with torch.no_grad():
            dequantised.weight.copy_(dequantise(conf, codes, scale, dtype).to(device))
        x = torch.randn(tokens, in_features, generator=generator).to(device, dtype)
        with torch.inference_mode():
            reference = linear(x).float()
            errors = [float((layer(x).float() - reference).norm() / reference.norm()) for layer in (int8, dequantised)]
            times = [
                timed(lambda layer=layer, x=x: layer(x), device, args.runs) for layer in (linear, int8, dequantised)
            ]
        row = {"layer": name, "bf16_ms": times[0], "w8a8_ms": times[1], "dequantised_ms": times[2],
               "w8a8_error": errors[0], "dequantised_error": errors[1]}  # fmt: skip
        rows.append(row)
        print(f"{name:8} {times[0]:9.3f} {times[1]:9.3f} {times[2]:11.3f} {times[0] / times[1]:12.2f}x "
              f"{errors[0]:9.4f} {errors[1]:8.4f}")  # fmt: skip
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "int8_matmul.json").write_text(json.dumps({"device": str(device), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
