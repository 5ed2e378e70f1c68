"""The bodies v2 routes take, as pydantic models: the one description of each, used both to validate it and
to describe it in /openapi.json. A body that breaks one is answered 422 `invalid_request`, naming each
field that is wrong."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from zimage_serve import strict_json
from zimage_serve.server.v2.envelope import V2Error, error_response

MAX_METADATA_BYTES = 1024
MAX_LABELS = 16
LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,62}$")
MAX_LABEL_VALUE = 256
MAX_KEY = 255  # an Idempotency-Key's characters (the SDK's limit too)
PRIORITY = 1_000_000
RESERVED = ("webhook_url", "inputs")  # fields the spec keeps for later and refuses today


class ExtraData(BaseModel):
    """ComfyUI's per-prompt `extra_data`, closed as v2 has it: a partner-node key, used for this run only."""

    model_config = ConfigDict(extra="forbid")
    api_key_comfy_org: str | None = None


class SubmitJob(BaseModel):
    """POST /api/v2/jobs."""

    model_config = ConfigDict(extra="forbid")
    workflow: dict[str, Any] = Field(description="An API-format workflow graph, verbatim.")
    extra_data: ExtraData | None = None
    metadata: str | dict[str, str] | None = Field(
        None,
        description="Labels for the job (up to 16 `key: value` texts, filterable with `metadata[key]=value` "
        "on the job list), or an opaque text of at most 1 KiB; echoed on the job.",
    )
    priority: int | None = Field(None, ge=-PRIORITY, le=PRIORITY, description="Advisory; stored and echoed.")

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: str | dict[str, str] | None) -> str | dict[str, str] | None:
        if isinstance(value, str):
            if len(value.encode("utf-8", "surrogatepass")) > MAX_METADATA_BYTES:
                raise ValueError(f"a text of at most {MAX_METADATA_BYTES} bytes")
        elif isinstance(value, dict):
            if len(value) > MAX_LABELS:
                raise ValueError(f"at most {MAX_LABELS} labels")
            for key, text in value.items():
                if not LABEL_KEY.match(key):
                    raise ValueError(f"label {key[:70]!r}: letters, digits and _.:/- only, 1 to 63 characters")
                if len(text) > MAX_LABEL_VALUE:
                    raise ValueError(f"label {key!r}: a value of at most {MAX_LABEL_VALUE} characters")
        return value


class FromHash(BaseModel):
    """POST /api/v2/assets/from-hash (its spec allows fields it does not name: they are ignored, whatever
    they hold)."""

    model_config = ConfigDict(extra="ignore")
    hash: str
    file_path: str | None = None
    tags: list[str] | None = None
    expires_in: int | None = Field(None, ge=60, le=604800)

    @field_validator("hash", "file_path")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        if value is not None:
            value.encode("utf-8")  # a lone surrogate is not text: UnicodeEncodeError is a ValueError
        return value

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: list[str] | None) -> list[str] | None:
        for tag in value or ():
            tag.encode("utf-8")
        return value


def parsed(raw: bytes, model: type[BaseModel], *, strict: bool = True) -> Any:
    """The body `raw` as `model`: strict JSON (no NaN, no duplicate keys, bounded depth and integers), then
    the model; V2Error 422 naming what is wrong. `strict=False` for a body whose unnamed fields are ignored:
    any JSON, the fields the model names checked by it."""
    if not raw.strip():
        raise V2Error(422, "invalid_request", "The request body is empty: send a JSON object")
    try:
        body = strict_json.loads(raw) if strict else json.loads(raw)
    except strict_json.JsonRejected as exc:
        raise V2Error(422, "invalid_request", f"The request body is not valid JSON: {exc}") from exc
    except (ValueError, RecursionError) as exc:
        raise V2Error(422, "invalid_request", "The request body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise V2Error(422, "invalid_request", "The request body must be a JSON object")
    reserved = [name for name in RESERVED if name in body]
    if reserved and model is SubmitJob:
        raise V2Error(
            422,
            "invalid_request",
            f"{reserved[0]}: reserved by Comfy API v2 for a later version, and refused today",
            {"errors": [{"field": reserved[0], "message": "reserved"}]},
        )
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise V2Error(*_invalid(exc.errors())) from exc


def idempotency_key(headers: Mapping[str, str]) -> str | None:
    """The request's Idempotency-Key (None without one): 1 to 255 printable ASCII characters, else 422."""
    key = headers.get("idempotency-key")
    if key is not None and (not key or len(key) > MAX_KEY or not all(" " <= c <= "~" for c in key)):
        raise V2Error(
            422,
            "invalid_request",
            f"Idempotency-Key: 1 to {MAX_KEY} printable ASCII characters (a UUID is best)",
            {"errors": [{"field": "Idempotency-Key", "message": "invalid"}]},
        )
    return key


def v2_validation_error(errors: Sequence[Any]) -> JSONResponse:
    """FastAPI's own validation errors (a query parameter, say) in v2's envelope."""
    return error_response(*_invalid(errors))


def _invalid(errors: Sequence[Any]) -> tuple[int, str, str, dict[str, Any]]:
    listed = [
        {"field": ".".join(str(part) for part in error.get("loc", ()) if part != "body"), "message": error.get("msg")}
        for error in errors
    ]
    first = listed[0] if listed else {"field": "", "message": "invalid"}
    # Labels have a code of their own, which the official client raises as such.
    kind = "metadata_invalid" if str(first["field"]).split(".")[0] == "metadata" else "invalid_request"
    return 422, kind, f"{first['field'] or 'body'}: {first['message']}", {"errors": listed}
