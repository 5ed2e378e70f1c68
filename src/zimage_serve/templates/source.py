"""A template from what a user has: a template document, an API-format workflow, or a UI-format one.

A plain workflow gets the usual parameters (`infer.infer_parameters`); a document keeps its own. UI
format needs the node set to name its widgets, so the caller passes the conversion in: this package
stays free of the node set for the client's sake.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zimage_serve.errors import ZImageError
from zimage_serve.templates.document import NAME, Template, TemplateError, check_workflow
from zimage_serve.templates.infer import infer_parameters

ToApi = Callable[[Any], dict[str, Any]]


def is_api_workflow(data: Any) -> bool:
    nodes = data.values() if isinstance(data, dict) else ()
    return bool(nodes) and all(isinstance(v, dict) and "class_type" in v for v in nodes)


def is_ui_workflow(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def template_from(
    data: Any, name: str, *, to_api: ToApi, title: str | None = None, description: str | None = None
) -> Template:
    """A version-less template named `name` (the library numbers it when it is added)."""
    try:
        return _template_from(data, name, to_api, title, description)
    except TemplateError:
        raise
    except ZImageError as exc:  # a UI-format workflow its conversion refused
        raise TemplateError(f"workflow: {exc}") from None


def _template_from(data: Any, name: str, to_api: ToApi, title: str | None, description: str | None) -> Template:
    if isinstance(data, dict) and "workflow" in data and not is_api_workflow(data):
        document = dict(data)
        if is_ui_workflow(document["workflow"]):
            document["workflow"] = to_api(document["workflow"])
        if "parameters" not in document:
            inferred = infer_parameters(check_workflow(document["workflow"]))
            document["parameters"] = {k: p.to_json() for k, p in inferred.items()}
    elif is_api_workflow(data) or is_ui_workflow(data):
        workflow = check_workflow(data if is_api_workflow(data) else to_api(data))
        document = {"workflow": workflow, "parameters": {k: p.to_json() for k, p in infer_parameters(workflow).items()}}
    else:
        raise TemplateError("the file is neither a template, nor an API-format or UI-format workflow")
    if title is not None:
        document["title"] = title
    if description is not None:
        document["description"] = description
    document.pop("version", None)
    document.pop("builtin", None)
    return Template.from_json(document, name=name, version=1)


def read_template_file(path: Path, to_api: ToApi | None = None) -> Template:
    """A template from a local file; without `to_api`, a UI-format workflow is refused (it needs the node set)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TemplateError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise TemplateError(f"{path}: not JSON ({exc})") from None

    def refuse_ui(_: Any) -> dict[str, Any]:
        raise TemplateError(f"{path}: UI format; add it with `zimage templates add`, which names its widgets")

    named = data.get("name") if isinstance(data, dict) else None
    name = named if isinstance(named, str) and NAME.match(named) else "local"
    return template_from(data, name, to_api=to_api or refuse_ui)
