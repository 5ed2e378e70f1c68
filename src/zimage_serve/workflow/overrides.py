"""`--set NODE.INPUT=VALUE`: changing a workflow's prompt, seed or any input from the command line."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from zimage_serve.errors import InvalidParameterError
from zimage_serve.workflow.spec import Node


def parse_assignment(text: str) -> tuple[str, str, Any]:
    """`6.text=a cat` → ("6", "text", "a cat"); values that parse as JSON (42, 1.5, true) are typed. The
    node id ends at the first dot: `9.format.crf=20` sets input `format.crf` (a V3 node's dotted input)."""
    key, sep, raw = text.partition("=")
    node, dot, name = key.strip().partition(".")
    if not sep or not dot or not node or not name:
        raise InvalidParameterError("--set", f"{text!r} must look like NODE_ID.INPUT=VALUE (e.g. 3.seed=42)")
    try:
        value: Any = json.loads(raw)
        if isinstance(value, dict):
            value = raw
    except ValueError:
        value = raw
    return node, name, value


def apply_overrides(prompt: dict[str, Any], assignments: Iterable[str], nodes: Mapping[str, type[Node]]) -> None:
    for text in assignments:
        node_id, name, value = parse_assignment(text)
        node = prompt.get(node_id)
        if node is None:
            known = ", ".join(sorted(prompt, key=lambda k: (len(k), k)))
            raise InvalidParameterError("--set", f"{text!r}: the workflow has no node {node_id} (it has {known})")
        node_class = nodes.get(str(node.get("class_type")))
        declared = node_class.inputs_for(node.get("inputs") or {}) if node_class is not None else None
        if declared is not None and name not in declared:
            names = ", ".join(declared)
            raise InvalidParameterError(
                "--set", f"{text!r}: node {node_id} ({node['class_type']}) has no input {name!r}; it has {names}"
            )
        node.setdefault("inputs", {})[name] = value
