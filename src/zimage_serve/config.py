"""`zimage serve`'s settings, from three places: its flags, a TOML file (`--config FILE`) and `ZIMAGE_*`
environment variables, in that order of precedence (a flag wins), read by pydantic-settings.

Keys are the flags' names with underscores (`max_pixels = 4194304`, `allow_ip = ["10.0.0.0/8"]`);
lists in the environment are JSON (`ZIMAGE_ALLOW_IP='["10.0.0.0/8"]'`). `ZIMAGE_MODELS` keeps its
PATH-like form (read by the command, not here).
"""

from __future__ import annotations

import contextvars
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import ByteSize, Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from zimage_serve.errors import ZImageError
from zimage_serve.limits import USER_BYTES, USER_FILES, Limits

_DEFAULT_LIMITS = Limits()
_TOML: contextvars.ContextVar[Path | None] = contextvars.ContextVar("zimage_config_toml", default=None)


class ConfigError(ZImageError):
    """A setting that cannot be used; the message names the flag (and where the value came from)."""

    def __init__(self, message: str, option: str = "") -> None:
        super().__init__(message)
        self.option = option


class _Environment(EnvSettingsSource):
    """`ZIMAGE_*` variables, but not ZIMAGE_MODELS (PATH-like, not JSON: the command reads it)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        if field_name == "models":
            return None, field_name, False
        return super().get_field_value(field, field_name)


class ServeConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ZIMAGE_", extra="forbid", validate_default=True)

    listen: str = "127.0.0.1"
    port: int = Field(8188, ge=1, le=65535)
    data_dir: Path | None = None
    models: list[Path] = Field(default_factory=list)
    device: str = "auto"
    dtype: str = "auto"
    memory_mode: str = "auto"
    attention: str = "auto"
    compile: str = "auto"
    int8_matmul: str = "auto"
    max_queue: int = Field(10000, ge=1)
    job_timeout: float | None = Field(None, ge=0)
    concurrency: int = Field(1, ge=1)
    preload: bool = True
    worker_process: bool = True
    shutdown_grace: float = Field(30.0, ge=0)
    preview_method: Literal["auto", "latent2rgb", "none"] = "auto"
    preview_size: int = Field(512, ge=16, le=4096)
    max_pixels: int = Field(_DEFAULT_LIMITS.pixels, ge=1)
    max_batch: int = Field(_DEFAULT_LIMITS.batch, ge=1)
    max_steps: int = Field(_DEFAULT_LIMITS.steps, ge=1)
    max_prompt_tokens: int = Field(_DEFAULT_LIMITS.prompt_tokens, ge=1)
    max_prompt_bytes: int = Field(_DEFAULT_LIMITS.prompt_bytes, ge=1)
    max_nodes: int = Field(_DEFAULT_LIMITS.nodes, ge=1)
    max_upload_pixels: int = Field(_DEFAULT_LIMITS.upload_pixels, ge=1)
    max_request_pixels: int = Field(_DEFAULT_LIMITS.request_pixels, ge=1)
    auth: Literal["auto", "on", "off"] = "auto"
    allow_ip: list[str] = Field(default_factory=list)
    trusted_proxy: list[str] = Field(default_factory=list)
    allow_origin: list[str] = Field(default_factory=list)
    public_url: str | None = None
    blocklist: list[Path] = Field(default_factory=list)
    audit_prompts: Literal["text", "hash"] = "text"
    audit_rotate_mb: int = Field(64, ge=1)
    audit_max_bytes: ByteSize = Field(ByteSize(1024**3), ge=1024 * 1024)
    audit_retention_days: float = Field(0, ge=0, le=36500)
    user_storage: ByteSize = Field(ByteSize(USER_BYTES), ge=1)
    user_files: int = Field(USER_FILES, ge=1)
    queue: str | None = None
    workers: int = Field(1, ge=0, le=64)
    lease: float = Field(30.0, ge=1, le=3600)
    metrics_port: int | None = Field(None, ge=1, le=65535)
    node_name: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    job_retention_days: float = Field(30, gt=0, le=36500)
    event_streams: int = Field(100, ge=1, le=100_000)
    webhook_allow: list[str] = Field(default_factory=list)
    webhook_retry_hours: float = Field(24, gt=0, le=720)
    output_store: str | None = Field(None, pattern=r"^s3://")
    keep_local: bool = True
    output_public_url: str | None = Field(None, pattern=r"^https?://")
    output_url_lifetime: int = Field(3600, ge=1, le=7 * 86400)
    output_retry_hours: float = Field(24, gt=0, le=720)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, _Environment(settings_cls)]
        toml = _TOML.get()
        if toml is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
        return tuple(sources)

    @classmethod
    def load(cls, toml: Path | None = None, **flags: Any) -> ServeConfig:
        """The settings: `flags` (those given on the command line) over the environment over `toml`."""
        if toml is not None:
            if not toml.is_file():
                raise ConfigError(f"{toml} is not a file", "--config")
            try:
                tomllib.loads(toml.read_text("utf-8"))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{toml} is not valid TOML: {exc}", "--config") from exc
        marker = _TOML.set(toml)
        try:
            return cls(**{k: v for k, v in flags.items() if v is not None})
        except ValidationError as exc:
            error = exc.errors()[0]
            name = str(error["loc"][0]) if error["loc"] else ""
            where = (
                "flag"
                if name in flags and flags[name] is not None
                else f"ZIMAGE_{name.upper()} or {toml or 'the config'}"
            )
            raise ConfigError(f"{error['msg']} (from the {where})", "--" + name.replace("_", "-")) from exc
        finally:
            _TOML.reset(marker)

    def limits(self) -> Limits:
        return Limits(
            pixels=self.max_pixels,
            batch=self.max_batch,
            steps=self.max_steps,
            prompt_tokens=self.max_prompt_tokens,
            prompt_bytes=self.max_prompt_bytes,
            nodes=self.max_nodes,
            upload_pixels=self.max_upload_pixels,
            request_pixels=self.max_request_pixels,
        )
