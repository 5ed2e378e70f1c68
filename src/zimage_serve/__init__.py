"""zimage-serve: Z-Image generation with ComfyUI's API."""

__version__ = "0.1.0"
