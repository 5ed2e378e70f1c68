"""The engine's names that the API side needs too (validation, object_info, folder lists), in a module
that imports nothing: the server process checks prompts against them without loading torch or diffusers,
so it starts in a fraction of the time the worker needs to import the models' code."""

from __future__ import annotations

# ComfyUI's names, in ComfyUI's order, of the samplers and schedulers that suit a flow model.
SAMPLERS = (
    *("euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "lcm", "deis"),
    *("res_multistep", "ddim", "uni_pc"),
)
SCHEDULERS = ("simple", "sgm_uniform", "karras", "exponential", "beta", "normal", "linear_quadratic", "kl_optimal")
# Samplers ComfyUI's KSampler gives one step more, dropping the penultimate σ.
DISCARD_PENULTIMATE_SIGMA = ("dpm_2", "uni_pc")
WEIGHT_DTYPES: tuple[str, ...] = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")

LATENT_FACTOR = 8  # pixels per latent cell along each side: the VAE's downscaling

# Folder names ComfyUI uses (and the older names it still reads) for each kind.
ROOT_FOLDERS: dict[str, tuple[str, ...]] = {
    "transformer": ("diffusion_models", "unet"),
    "text_encoder": ("text_encoders", "clip"),
    "vae": ("vae",),
    "lora": ("loras",),
    "model_patch": ("model_patches",),
}

# Canny thresholds of the official Turbo + Fun ControlNet template (ComfyUI's node defaults are 0.4 and 0.8).
CANNY_TEMPLATE_LOW, CANNY_TEMPLATE_HIGH = 0.1, 0.32
