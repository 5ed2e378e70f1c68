"""Environment variables that configure zimage-serve."""

from __future__ import annotations

MODEL_ENV = "ZIMAGE_MODEL"  # the model used when --model is not given
MODELS_ENV = "ZIMAGE_MODELS"  # ComfyUI models folders for workflows, separated like PATH
