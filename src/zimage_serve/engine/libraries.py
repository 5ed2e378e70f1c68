"""diffusers and transformers, imported when the first model is loaded, not when the engine is.

Together they cost a worker about 290 MiB and several seconds (torch's compiler stack, scipy and
torchvision come with them), which a job without a model (LoadImage → SaveImage, the image and mask
nodes) never needs, nor a worker started with `--no-preload` until its first model job. The engine's
modules therefore import them inside the functions that build, convert or hook model components, after
`load_model_libraries()`.

Job threads make these first imports one at a time (`importing`): two threads importing large, internally
circular packages side by side (transformers pulling in scipy while GrowMask imports scipy.ndimage, say)
can each be handed the other's half-initialised module by Python's per-module import locks. Once a
package is in, the imports inside functions only look names up.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_lock = threading.RLock()
_loaded = False


@contextlib.contextmanager
def importing() -> Iterator[None]:
    """Hold around a job's import of a large package on its first use (scipy, kornia, spandrel, torchsde)."""
    with _lock:
        yield


def load_model_libraries() -> None:
    """Import diffusers and transformers once (accelerate, light, comes with the engine)."""
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        # The classes a Z-Image model is built from, and what the engine converts and hooks with: importing
        # them is what pulls in the packages' heavy dependencies, once, here.
        import diffusers.loaders.single_file_utils  # noqa: F401
        from diffusers import AutoencoderKL, ZImageTransformer2DModel  # noqa: F401
        from transformers import AutoTokenizer, Qwen3Config, Qwen3Model  # noqa: F401

        _loaded = True
