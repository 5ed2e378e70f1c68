"""Fit the linear latent-to-RGB map that live previews use, against a VAE's own decodes.

    .venv/bin/python tools/fit_latent_rgb.py                       # zimage-nano: writes its vae/latent_rgb.json
    .venv/bin/python tools/fit_latent_rgb.py --model DIR            # a diffusers folder: DIR/vae/latent_rgb.json
    .venv/bin/python tools/fit_latent_rgb.py --vae ae.safetensors --out flux.json   # a single-file VAE

The server fits the map itself, once per process, for a VAE that brings none (engine/latent_preview.py);
a folder's file saves that step and lets the first image of a run have previews too. It prints how close
the map comes: the mean error, in 8-bit levels, of the map's colours against the decodes it was fitted
to, and against decodes of pictures it was not fitted to.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from zimage_serve.engine.latent_preview import TABLE_FILE, LatentToRGB, fit, fit_pictures
from zimage_serve.engine.layouts import diffusers_component, single_file
from zimage_serve.engine.libraries import load_model_libraries
from zimage_serve.engine.parts import LatentFormat, Vae, load_vae
from zimage_serve.engine.placement import Placement
from zimage_serve.nano.default import SHIPPED


def error_levels(table: LatentToRGB, vae: Vae, fmt: LatentFormat, pictures: torch.Tensor) -> float:
    """Mean absolute difference, in 8-bit levels, between the map's colours and the decode's cell colours."""
    raw = vae.encode(pictures)
    decoded = vae.decode(raw)
    latent = fmt.process_in(raw.float())
    cells = torch.nn.functional.adaptive_avg_pool2d(decoded.permute(0, 3, 1, 2), latent.shape[-2:])
    total = 0.0
    for i in range(latent.shape[0]):
        mapped = torch.from_numpy(table.project(latent[i : i + 1]).astype("float32")).permute(2, 0, 1)
        total += float((mapped - cells[i] * 255).abs().mean())
    return total / latent.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a diffusers folder (default: the built-in zimage-nano)")
    parser.add_argument("--vae", type=Path, help="a single-file VAE (ComfyUI's vae folder)")
    parser.add_argument("--out", type=Path, help="where to write the map (default: the folder's vae/)")
    args = parser.parse_args()
    load_model_libraries()
    placement = Placement.choose("cpu")
    if args.vae is not None:
        vae = load_vae(args.vae.name, single_file("vae", args.vae), placement)
        out = args.out
    else:
        folder = args.model or SHIPPED
        vae = load_vae(folder.name, diffusers_component(folder, "vae"), placement)
        out = args.out or folder / "vae" / TABLE_FILE
    fmt = vae.scaling
    table = fit(vae, fmt)
    fitted = error_levels(table, vae, fmt, fit_pictures())
    unseen = error_levels(table, vae, fmt, fit_pictures(seed=1))
    print(f"mean error: {fitted:.1f} levels on the pictures fitted to, {unseen:.1f} on others", file=sys.stderr)
    text = json.dumps(table.to_json(), indent=1) + "\n"
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text, encoding="utf-8")
        print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
