"""What one prompt may ask of the machine: pixels, batch, steps, prompt length, graph size, uploads; and
what one user may keep on its disk (`StorageLimits`, enforced by security/storage.py).

The limits are checked before a job is queued (the validator reads the demands nodes declare) and again
where the work happens (a node refuses to start work beyond them), so a graph that slips past one check,
say an image whose size only shows once it is loaded, still cannot take the worker for minutes. Each
limit is named as the `zimage serve` flag that sets it, and the defaults are far above what a Z-Image
user asks for: 4 MP (2048²) per image, 16 images a batch, 200 steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from zimage_serve.errors import ZImageError

MEGAPIXELS_4 = 2048 * 2048

# The sides of a picture the models draw, the same for `zimage generate`, the OpenAI route, templates'
# width and height, and the latents of workflows (copies kept in each had drifted apart: 2048 in one place,
# 4096 in another, ComfyUI's 16..16384 in the rest). These are the models' own bounds, not the
# machine's, so no flag changes them: what a picture costs is bounded by `Limits.pixels` (--max-pixels).
SIDE_STEP = 16  # the VAE's factor 8 × the transformer's patch 2: a side in whole patches
MIN_SIDE = 64  # four patches; the least `zimage generate` and the OpenAI route ever took
MAX_SIDE = 4096  # twice the 6B models' largest trained side (2048), within their position grid (512 patches)


USER_BYTES = 1024**3  # what each user may store by default (--user-storage)
USER_FILES = 10_000  # (--user-files)


@dataclass(frozen=True)
class StorageLimits:
    bytes: int = USER_BYTES
    files: int = USER_FILES


@dataclass(frozen=True)
class Limits:
    pixels: int = MEGAPIXELS_4  # per image: width × height
    batch: int = 16  # images in one latent batch, frames loaded from one file
    steps: int = 200  # sampler steps
    prompt_tokens: int = 1024  # tokens of one prompt text (Z-Image reads 512; ComfyUI truncates nothing)
    prompt_bytes: int = 16 * 1024  # UTF-8 bytes of one prompt text
    nodes: int = 500  # nodes in one graph
    upload_pixels: int = 8 * MEGAPIXELS_4  # over every frame of an uploaded or loaded image
    request_pixels: int = 4 * MEGAPIXELS_4  # OpenAI's route: n × width × height
    # The limits a token lowered below the server's (`capped`), and the token's name, so a refusal names
    # the token's limit rather than a flag that would not help.
    token: str = field(default="", compare=False)
    capped: frozenset[str] = field(default=frozenset(), compare=False)

    def __post_init__(self) -> None:
        for spec in fields(self):
            if spec.name not in ("token", "capped") and getattr(self, spec.name) < 1:
                raise ValueError(f"{flag(spec.name)} must be at least 1")

    def for_token(self, token: str, **caps: int | None) -> Limits:
        """These limits lowered by a token's own (`pixels=`, `steps=` ...; None: the server's)."""
        lowered = {k: v for k, v in caps.items() if v is not None and v < getattr(self, k)}
        if not lowered:
            return self
        return replace(self, **lowered, token=token, capped=self.capped | frozenset(lowered))

    def refusal(self, limit: str, value: int) -> str:
        """The sentence that refuses `value` for `limit`, naming who set the limit."""
        allowed: int = getattr(self, limit)
        if limit in self.capped:
            return f"{value:,} {WHAT[limit]} is more than the {allowed:,} token {self.token!r} allows (its max_{limit})"
        return describe(limit, value, allowed)


WHAT = {
    "pixels": "pixels per image",
    "batch": "images in a batch",
    "steps": "steps",
    "prompt_tokens": "prompt tokens",
    "prompt_bytes": "prompt bytes",
    "nodes": "nodes in a graph",
    "upload_pixels": "image pixels over all frames",
    "request_pixels": "pixels in one request (n × width × height)",
}


def flag(limit: str) -> str:
    return "--max-" + limit.replace("_", "-")


def describe(limit: str, value: int, allowed: int) -> str:
    """The sentence a refusal carries: what was asked, what is allowed, and the flag that allows more."""
    return f"{value:,} {WHAT[limit]} is more than the {allowed:,} this server allows ({flag(limit)})"


class LimitExceeded(ZImageError):
    """Raised where work would begin beyond a limit; `limit` is the Limits field."""

    def __init__(self, limit: str, value: int, allowed: int, where: str = "", message: str = "") -> None:
        message = message or describe(limit, value, allowed)
        super().__init__(f"{where}: {message}" if where else message)
        self.limit, self.value, self.allowed = limit, value, allowed


def enforce(limits: Limits, limit: str, value: int, where: str = "") -> None:
    allowed: int = getattr(limits, limit)
    if value > allowed:
        raise LimitExceeded(limit, value, allowed, where, limits.refusal(limit, value))


def side_refusal(value: int, step: bool = True) -> str | None:
    """Why one side of a picture is refused (None: it is allowed), in the same words everywhere.

    `step`: whether it must be a multiple of SIDE_STEP too (workflows keep ComfyUI's own steps, which the
    frontend's widgets enforce; a latent of another size is cropped to the patch grid)."""
    if value < MIN_SIDE:
        return f"{value} is less than {MIN_SIDE}, the shortest side allowed"
    if value > MAX_SIDE:
        return f"{value} is more than {MAX_SIDE}, the longest side allowed"
    if step and value % SIDE_STEP:
        return f"{value} is not a multiple of {SIDE_STEP}"
    return None


def size_refusal(width: int, height: int, limits: Limits | None = None) -> tuple[str, str] | None:
    """The field at fault ("width", "height" or "size") and why a width × height picture is refused, or
    None. `limits`: a server's (its --max-pixels, or a token's lower cap); None: the defaults, for the CLI."""
    for name, value in (("width", width), ("height", height)):
        why = side_refusal(value)
        if why is not None:
            return name, why
    pixels = width * height
    if limits is not None:
        return ("size", limits.refusal("pixels", pixels)) if pixels > limits.pixels else None
    allowed = Limits().pixels
    if pixels > allowed:
        return "size", f"{width}×{height} is {pixels:,} pixels, more than the {allowed:,} allowed per image"
    return None
