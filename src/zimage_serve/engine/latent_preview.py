"""Live previews while a sampler runs: its newest prediction of the clean latent, projected to RGB by a linear
map (one 3 × channels matrix and a bias) and encoded as a small JPEG.

Each latent space has its own map, fitted by least squares against its VAE's own decodes (`fit`): smooth
synthetic pictures are encoded, their latents decoded again, and the decodes, averaged over each latent
cell, are what the map learns to give. A diffusers folder may bring its map beside its VAE
(`vae/latent_rgb.json`, written by `tools/fit_latent_rgb.py`; zimage-nano's is); for any other space
(Z-Image's, the Flux VAE's) the map is fitted from the first VAE of that space that is loaded (a few small
pictures: under a second on a GPU, a few on a CPU) and kept in the data dir (`previews/`), so every
worker sharing it, and every later start, has it from its first image on.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from zimage_serve.engine.pixels import eight_bit

if TYPE_CHECKING:
    import torch

    from zimage_serve.engine.parts import LatentFormat, Vae

log = logging.getLogger(__name__)
TABLE_FILE = "latent_rgb.json"
JPEG_QUALITY = 85
FIT_PICTURES, FIT_SIZE = 12, 96


@dataclass(frozen=True)
class LatentToRGB:
    """RGB in 0..1 = matrix · latent (the sampler's space) + bias, per latent cell."""

    matrix: tuple[tuple[float, ...], ...]  # 3 rows of `channels` weights
    bias: tuple[float, float, float]

    @property
    def channels(self) -> int:
        return len(self.matrix[0])

    def project(self, latent: torch.Tensor) -> np.ndarray[Any, np.dtype[np.uint8]]:
        """The first picture of a batch of latents (B, C, h, w) as 8-bit RGB (h, w, 3).

        In torch, on the tensor's own device, not numpy: numpy's matrix product wakes its BLAS threads,
        which then spin for a while on the cores the sampler is using (measured: 3-5 % of an image's time
        on 2 cores, for a product of a few thousand numbers)."""
        import torch

        first = latent[0].detach().float()
        matrix = torch.tensor(self.matrix, dtype=torch.float32, device=first.device)
        bias = torch.tensor(self.bias, dtype=torch.float32, device=first.device)
        rgb = torch.einsum("rc,chw->hwr", matrix, first) + bias
        return eight_bit(rgb.cpu().numpy())

    def to_json(self) -> dict[str, Any]:
        return {"matrix": [list(row) for row in self.matrix], "bias": list(self.bias)}

    @classmethod
    def of(cls, data: dict[str, Any]) -> LatentToRGB:
        matrix = tuple(tuple(float(v) for v in row) for row in data["matrix"])
        bias = tuple(float(v) for v in data["bias"])
        if len(matrix) != 3 or len(bias) != 3 or len({len(row) for row in matrix}) != 1:
            raise ValueError("a latent-to-RGB map is 3 rows of weights and 3 biases")
        return cls(matrix, (bias[0], bias[1], bias[2]))


def jpeg(pixels: np.ndarray[Any, np.dtype[np.uint8]], max_side: int) -> bytes:
    """8-bit RGB as a JPEG whose longer side is at most `max_side`."""
    picture = Image.fromarray(pixels, "RGB")
    if max(picture.size) > max_side:
        picture.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def fit_pictures(count: int = FIT_PICTURES, size: int = FIT_SIZE, seed: int = 0) -> torch.Tensor:
    """Smooth synthetic pictures (B, H, W, 3 in 0..1): random colour fields at a few scales, flat colours
    and gradients, which cover the colours a linear map has to tell apart."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    pictures = []
    for i in range(count):
        grid = 2 + i % 5
        field = torch.rand(1, 3, grid, grid, generator=generator)
        smooth = torch.nn.functional.interpolate(field, size=(size, size), mode="bicubic", align_corners=False)
        pictures.append(smooth.clamp(0, 1)[0].permute(1, 2, 0))
    return torch.stack(pictures)


def fit(vae: Vae, fmt: LatentFormat, pictures: torch.Tensor | None = None) -> LatentToRGB:
    """The least-squares map from `fmt`'s latents (the sampler's space) to the VAE's decodes, averaged over
    each latent cell."""
    import torch

    pictures = fit_pictures() if pictures is None else pictures
    raw = vae.encode(pictures)
    decoded = vae.decode(raw)  # (B, H, W, 3) in 0..1
    latent = fmt.process_in(raw.float())
    height, width = latent.shape[-2:]
    cells = torch.nn.functional.adaptive_avg_pool2d(decoded.permute(0, 3, 1, 2).float(), (height, width))
    inputs = latent.permute(0, 2, 3, 1).reshape(-1, latent.shape[1]).double()
    targets = cells.permute(0, 2, 3, 1).reshape(-1, 3).double()
    design = torch.cat([inputs, torch.ones(inputs.shape[0], 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, targets).solution  # (C + 1, 3)
    weights = solution[:-1].T.tolist()
    bias = solution[-1].tolist()
    return LatentToRGB(tuple(tuple(row) for row in weights), (bias[0], bias[1], bias[2]))


class Previews:
    """The maps this process knows, per latent space, and the VAEs that can fit a missing one."""

    def __init__(self) -> None:
        self._tables: dict[LatentFormat, LatentToRGB] = {}
        self._teachers: dict[LatentFormat, weakref.ref[Vae]] = {}
        self._lock = threading.Lock()
        self._fitting: set[LatentFormat] = set()
        self._folder: Path | None = None

    def keep_in(self, folder: Path | None) -> None:
        """Where fitted maps are kept (None: in memory only)."""
        self._folder = folder

    def know(self, fmt: LatentFormat, table: LatentToRGB) -> None:
        with self._lock:
            self._tables[fmt] = table

    def know_file(self, fmt: LatentFormat, folder: Path, name: str = TABLE_FILE) -> bool:
        """The map a folder brings (`latent_rgb.json`), if it brings one."""
        path = folder / name
        if not path.is_file():
            return False
        try:
            self.know(fmt, LatentToRGB.of(json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: not a latent-to-RGB map (%s); previews of this model fit their own", path, exc)
            return False
        return True

    def teach(self, vae: Vae) -> None:
        """A VAE was loaded: it can fit its space's map when a preview first needs one."""
        with self._lock:
            if vae.scaling not in self._tables:
                self._teachers[vae.scaling] = weakref.ref(vae)

    def table(self, fmt: LatentFormat) -> LatentToRGB | None:
        """The map for `fmt`, fitted now from a VAE of that space if none is known (None: no such VAE yet)."""
        with self._lock:
            known = self._tables.get(fmt)
            if known is not None or fmt in self._fitting:
                return known
            kept = self._folder / kept_name(fmt) if self._folder is not None else None
        if kept is not None and self.know_file(fmt, kept.parent, kept.name):
            return self._tables.get(fmt)
        with self._lock:
            teacher = self._teachers.get(fmt)
            vae = teacher() if teacher is not None else None
            if vae is None:
                return None
            self._fitting.add(fmt)
        try:
            table = fit(vae, fmt)
            log.info("previews: fitted the latent-to-RGB map of %s", vae.name)
            self.know(fmt, table)
            if kept is not None:
                _write(kept, table)
            return table
        except Exception:  # a preview is never worth a failed job
            log.warning("previews: could not fit a latent-to-RGB map from %s", vae.name, exc_info=True)
            return None
        finally:
            with self._lock:
                self._fitting.discard(fmt)
                self._teachers.pop(fmt, None)


def kept_name(fmt: LatentFormat) -> str:
    """The file a fitted map of a latent space is kept in: named by its scale and shift."""
    return f"latent-rgb-{fmt.scale:.6g}-{fmt.shift:.6g}.json".replace("+", "")


def _write(path: Path, table: LatentToRGB) -> None:
    """Written whole or not at all (workers sharing a data dir may write one at once)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        temp.write_text(json.dumps(table.to_json()), encoding="utf-8")
        os.replace(temp, path)
    except OSError as exc:  # a read-only data dir: the map stays in memory
        log.warning("previews: could not keep the fitted map in %s (%s)", path, exc)


PREVIEWS = Previews()
