"""The request bodies and query parameters of every route, for the OpenAPI schema at /openapi.json.

The routes read their bodies themselves (strict JSON, ComfyUI's error shapes, no 422s of FastAPI's
own): each route names its body here and `document` puts the models into the schema's components.
Clients, code generators and the fuzzing suite (schemathesis) read the same description, and a route
whose body has no rule of its own beyond them checks it with the same model (`validated`), so the
contract has one home.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_CLIENT_ID = 256  # characters of a client_id (a WebSocket session's name)
Body = TypeVar("Body", bound=BaseModel)


class BodyError(ValueError):
    """A body its model refuses; the message names the first field at fault and why."""


def validated(model: type[Body], body: object) -> Body:
    """`body` (parsed JSON) checked by `model`, strictly: no text taken for a number, no unknown field."""
    try:
        return model.model_validate(body, strict=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise BodyError(f"{where}: {first['msg']}") from None


class GraphNode(BaseModel):
    model_config = ConfigDict(extra="allow")
    class_type: str = Field(description="A node class from GET /object_info")
    inputs: dict[str, Any] = Field(default_factory=dict, description="Values, or links [node_id, output_index]")


class PromptRequest(BaseModel):
    """POST /prompt: ComfyUI's body."""

    prompt: dict[str, GraphNode] = Field(description="An API-format graph, node id → node")
    client_id: str | None = Field(None, max_length=MAX_CLIENT_ID, description="The WebSocket session to send events to")
    extra_data: dict[str, Any] | None = Field(None, description="Kept with the job (extra_pnginfo ...)")
    number: float | None = Field(None, description="Priority: the lowest runs first")
    front: bool | None = Field(None, description="Run before everything waiting")
    prompt_id: str | None = Field(None, description="A lowercase hyphenated UUID; one is made when absent")
    partial_execution_targets: list[str] | None = Field(None, description="Only these output nodes run")


class QueueChange(BaseModel):
    """POST /queue and POST /history."""

    clear: bool | None = None
    delete: list[str] | None = Field(None, description="Prompt ids")


class InterruptRequest(BaseModel):
    prompt_id: str | None = Field(None, description="Only this prompt; every running one when absent")


class FreeRequest(BaseModel):
    unload_models: bool | None = None
    free_memory: bool | None = None


class ImagesRequest(BaseModel):
    """POST /v1/images/generations: OpenAI's body (`seed` is ours)."""

    prompt: str = Field(min_length=1)
    model: str | None = Field(None, description="GET /v1/models lists them; zimage-nano when absent")
    n: int | None = Field(None, ge=1, le=10)
    size: str | None = Field(None, pattern=r"^\d{2,5}x\d{2,5}$", description="WIDTHxHEIGHT, multiples of 16")
    response_format: Literal["url", "b64_json"] | None = None
    seed: int | None = Field(None, ge=0, le=2**64 - 1)
    quality: str | None = None
    style: str | None = None
    user: str | None = None


class WebhookRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="What jobs call it in extra_data.webhook (letters, digits, '.', '_', '-')")
    url: str = Field(description="Where the events are POSTed (http or https)")
    events: list[Literal["queued", "started", "succeeded", "failed", "canceled"]] | None = Field(
        None, description="The events it receives (all when left out)"
    )
    user: str | None = Field(None, description="Only this user's jobs may name it (a token's name)")
    subscribe: bool = Field(False, description="Every job's events (the user's, or everyone's), named or not")


class ReplayRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ids: list[str] | None = Field(None, description="The webhook-ids to send again (every dead one when left out)")


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The user's name (letters, digits, '_', '.', '-')")
    role: Literal["user", "admin"] = "user"
    rpm: int | None = Field(None, ge=1, description="State-changing requests a minute")
    images_per_day: int | None = Field(None, ge=1, description="Images a day (UTC): every image a sampler makes")
    max_queued: int | None = Field(None, ge=1, description="Jobs waiting or running at once")
    max_pixels: int | None = Field(None, ge=1, description="Pixels per image")
    max_steps: int | None = Field(None, ge=1, description="Sampler steps")
    max_storage: int | None = Field(None, ge=1, description="Bytes of uploads, saved workflows and templates")
    max_files: int | None = Field(None, ge=1, description="Files of uploads, saved workflows and templates")
    inherit: bool = Field(
        False,
        description="Continue the user of the name's revoked token (their jobs, files and templates); "
        "otherwise a token under a used name is a new user",
    )


class UploadForm(BaseModel):
    """POST /upload/image (multipart)."""

    image: bytes = Field(json_schema_extra={"format": "binary"})
    type: Literal["input", "temp", "output"] | None = None
    subfolder: str | None = None
    overwrite: Literal["true", "false", "1", "0"] | None = None


class MaskForm(UploadForm):
    """POST /upload/mask (multipart): the mask's alpha is put on the image `original_ref` names."""

    original_ref: str = Field(description='JSON: {"filename": ..., "subfolder": ..., "type": ...}')


MODELS: tuple[type[BaseModel], ...] = (
    PromptRequest,
    QueueChange,
    InterruptRequest,
    FreeRequest,
    ImagesRequest,
    UploadForm,
    MaskForm,
    TokenRequest,
)


def json_request(model: type[BaseModel], required: bool = True) -> dict[str, Any]:
    """`openapi_extra` for a route whose JSON body is `model`."""
    reference = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": required, "content": {"application/json": {"schema": reference}}}}


def form_request(model: type[BaseModel]) -> dict[str, Any]:
    reference = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": reference}}}}


def query(*parameters: tuple[str, dict[str, Any], str]) -> dict[str, Any]:
    """`openapi_extra` for query parameters (name, JSON schema, description), all optional."""
    return {
        "parameters": [
            {"name": name, "in": "query", "required": False, "schema": schema, "description": text}
            for name, schema, text in parameters
        ]
    }


COUNT = {"type": "integer", "minimum": 0}


def document(app: FastAPI) -> None:
    """Make `app.openapi()` include the body models above as components."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in MODELS:
                described = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(described.pop("$defs", {}))
                components[model.__name__] = described
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
