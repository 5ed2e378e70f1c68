"""A template: an API-format workflow, the named parameters that change it, and a version.

A parameter maps one value onto one or more node inputs (`"3.seed"`), so code changes a prompt or a seed
by name instead of by node id. A parameter may also stand for an optional node: when it is left unset,
the node is bypassed, its outputs wired to the inputs they pass through (a LoRA loader without a LoRA).

This module is pure data and checking: the Python client renders templates with it on the caller's
side, against any ComfyUI server, so it imports neither the node set nor anything heavy.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from zimage_serve.errors import ZImageError

FORMAT = "zimage-template/1"
TYPES = ("string", "int", "float", "bool", "choice", "image")
NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
PARAMETER_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
TRUE, FALSE = frozenset({"true", "yes", "on", "1"}), frozenset({"false", "no", "off", "0"})


class TemplateError(ZImageError):
    """A template document that cannot be used; the message names the field at fault."""


class TemplateParameterError(TemplateError):
    """Values that do not fit a template's parameters: `problems` maps each parameter to why."""

    def __init__(self, template: str, problems: Mapping[str, str]) -> None:
        self.template = template
        self.problems = dict(problems)
        listed = "; ".join(f"{name}: {why}" for name, why in self.problems.items())
        super().__init__(f"template {template}: {listed}")


@dataclass(frozen=True)
class Target:
    node: str
    input: str

    @classmethod
    def parse(cls, text: Any, where: str) -> Target:
        node, dot, name = text.rpartition(".") if isinstance(text, str) else ("", "", "")
        if not dot or not node or not name:
            raise TemplateError(f"{where}: {text!r} must name a node input as NODE_ID.INPUT, e.g. 3.seed")
        return cls(node, name)

    def __str__(self) -> str:
        return f"{self.node}.{self.input}"


@dataclass(frozen=True)
class Bypass:
    """Left unset, the parameter removes `node`; what read its output slot k reads `through[k]` instead."""

    node: str
    through: dict[int, str]


@dataclass(frozen=True)
class Parameter:
    name: str
    type: str
    targets: tuple[Target, ...]
    default: Any = None
    description: str = ""
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    allow_empty: bool = True  # strings: whether "" is a value (a prompt must say something)
    bypass: Bypass | None = None

    def check(self, value: Any) -> Any:
        """The value this parameter takes for `value` (text from a CSV cell or `--set` is converted)."""
        if self.type in ("string", "image", "choice"):
            if not isinstance(value, str):
                raise ValueError(f"{_shown(value)} is not text")
            if self.type == "choice" and self.choices and value not in self.choices:
                raise ValueError(f"{_shown(value)} is not one of {', '.join(self.choices)}")
            if not value.strip() and (not self.allow_empty or self.type == "image"):
                raise ValueError("must not be empty")
            return value
        if self.type == "bool":
            if isinstance(value, str) and value.strip().lower() in TRUE | FALSE:
                return value.strip().lower() in TRUE
            if not isinstance(value, bool):
                raise ValueError(f"{_shown(value)} is not true or false")
            return value
        number = _number(value, self.type == "int")
        if self.minimum is not None and number < self.minimum:
            raise ValueError(f"{_shown(value)} is below the minimum {_plain(self.minimum)}")
        if self.maximum is not None and number > self.maximum:
            raise ValueError(f"{_shown(value)} is above the maximum {_plain(self.maximum)}")
        return number

    # -- the document's JSON ---------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"type": self.type, "targets": [str(t) for t in self.targets]}
        if self.default is not None:
            data["default"] = self.default
        if self.description:
            data["description"] = self.description
        if self.minimum is not None:
            data["min"] = self.minimum
        if self.maximum is not None:
            data["max"] = self.maximum
        if self.choices:
            data["choices"] = list(self.choices)
        if not self.allow_empty:
            data["allow_empty"] = False
        if self.bypass is not None:
            data["bypass"] = {"node": self.bypass.node, "through": {str(k): v for k, v in self.bypass.through.items()}}
        return data

    @classmethod
    def from_json(cls, name: str, data: Any) -> Parameter:
        where = f"parameters.{name}"
        if not PARAMETER_NAME.match(name):
            raise TemplateError(f"{where}: a name is lowercase letters, digits and '_', starting with a letter")
        if not isinstance(data, dict):
            raise TemplateError(f"{where}: must be an object")
        kind = data.get("type")
        if kind not in TYPES:
            raise TemplateError(f"{where}.type: {kind!r} is not one of {', '.join(TYPES)}")
        targets = data.get("targets")
        if not isinstance(targets, list) or not targets:
            raise TemplateError(f"{where}.targets: must list at least one NODE_ID.INPUT")
        bypass = data.get("bypass")
        parameter = cls(
            name=name,
            type=kind,
            targets=tuple(Target.parse(t, f"{where}.targets") for t in targets),
            default=data.get("default"),
            description=_text(data.get("description", ""), f"{where}.description"),
            minimum=_bound(data.get("min"), f"{where}.min"),
            maximum=_bound(data.get("max"), f"{where}.max"),
            choices=tuple(_text(c, f"{where}.choices") for c in _listed(data.get("choices"), f"{where}.choices")),
            allow_empty=data.get("allow_empty", True) is not False,
            bypass=_bypass(bypass, f"{where}.bypass") if bypass is not None else None,
        )
        if parameter.default is not None:
            try:
                parameter.check(parameter.default)
            except ValueError as exc:
                raise TemplateError(f"{where}.default: {exc}") from None
        return parameter


@dataclass(frozen=True)
class Template:
    name: str
    version: int
    workflow: dict[str, Any]
    parameters: dict[str, Parameter]
    title: str = ""
    description: str = ""
    native_size: int | None = None  # the one size a model was trained at, if it has only one
    created: float = 0.0
    builtin: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def render(self, values: Mapping[str, Any] | None = None, **more: Any) -> dict[str, Any]:
        """The workflow with `values` set; every wrong name and value is reported at once."""
        given = {**(values or {}), **more}
        problems: dict[str, str] = {}
        for name in given:
            if name not in self.parameters:
                problems[name] = f"no such parameter; {self.name} has {', '.join(self.parameters)}"
        chosen: dict[str, Any] = {}
        for name, parameter in self.parameters.items():
            value = given.get(name, parameter.default)
            if value is None:
                if parameter.bypass is None and name in given:
                    problems[name] = "needs a value"
                chosen[name] = None
                continue
            try:
                chosen[name] = parameter.check(value)
            except ValueError as exc:
                problems[name] = str(exc)
        if problems:
            raise TemplateParameterError(self.name, problems)
        graph = copy.deepcopy(self.workflow)
        for name, value in chosen.items():
            parameter = self.parameters[name]
            if value is None:
                if parameter.bypass is not None:
                    _bypass_node(graph, parameter.bypass)
                continue
            for target in parameter.targets:
                if target.node in graph:
                    graph[target.node].setdefault("inputs", {})[target.input] = value
        return graph

    def defaults(self) -> dict[str, Any]:
        return {name: p.default for name, p in self.parameters.items()}

    # -- the document's JSON ---------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": FORMAT,
            "name": self.name,
            "version": self.version,
            "title": self.title,
            "description": self.description,
            "created": self.created,
            "builtin": self.builtin,
            "parameters": {name: p.to_json() for name, p in self.parameters.items()},
            "workflow": self.workflow,
        }
        if self.native_size:
            data["native_size"] = self.native_size
        return data

    @classmethod
    def from_json(cls, data: Any, *, name: str | None = None, version: int | None = None) -> Template:
        """A template document, checked: every target names a node and an input the workflow has."""
        if not isinstance(data, dict):
            raise TemplateError("a template is a JSON object")
        if data.get("format", FORMAT) != FORMAT:
            raise TemplateError(f"format: {data.get('format')!r} is not {FORMAT}")
        workflow = check_workflow(data.get("workflow"))
        raw = data.get("parameters", {})
        if not isinstance(raw, dict):
            raise TemplateError("parameters: must be an object of name → parameter")
        parameters = {key: Parameter.from_json(key, value) for key, value in raw.items()}
        for parameter in parameters.values():
            for target in parameter.targets:
                if target.node not in workflow:
                    raise TemplateError(f"parameters.{parameter.name}.targets: the workflow has no node {target.node}")
            bypass = parameter.bypass
            if bypass is not None and bypass.node not in workflow:
                raise TemplateError(f"parameters.{parameter.name}.bypass: the workflow has no node {bypass.node}")
        template_name = check_name(name if name is not None else data.get("name"))
        native = data.get("native_size")
        if native is not None and (isinstance(native, bool) or not isinstance(native, int) or native <= 0):
            raise TemplateError("native_size: must be a positive whole number")
        number = version if version is not None else data.get("version", 1)
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise TemplateError("version: must be a whole number from 1")
        created = data.get("created", 0.0)
        return cls(
            name=template_name,
            version=number,
            workflow=workflow,
            parameters=parameters,
            title=_text(data.get("title", ""), "title"),
            description=_text(data.get("description", ""), "description"),
            native_size=native,
            created=float(created) if isinstance(created, int | float) and math.isfinite(created) else 0.0,
            builtin=data.get("builtin") is True,
        )

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "title": self.title,
            "description": self.description,
            "builtin": self.builtin,
            "created": self.created,
            "parameters": list(self.parameters),
        }

    def same_content(self, other: Template) -> bool:
        return self.workflow == other.workflow and self.to_json()["parameters"] == other.to_json()["parameters"]


def check_workflow(workflow: Any) -> dict[str, Any]:
    """An API-format workflow as a template holds it: node id → {class_type, inputs (an object)}."""
    if not isinstance(workflow, dict) or not workflow:
        raise TemplateError("workflow: must be an API-format workflow (node id → {class_type, inputs})")
    for node_id, node in workflow.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise TemplateError(f"workflow.{node_id}: a node needs a class_type")
        if not isinstance(node.get("inputs", {}), dict):
            raise TemplateError(f"workflow.{node_id}.inputs: must be an object of input name → value")
    return workflow


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME.match(name) or name.endswith("."):
        raise TemplateError(
            f"name: {name!r} must be 1–64 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def _bypass_node(graph: dict[str, Any], bypass: Bypass) -> None:
    removed = graph.pop(bypass.node, None)
    if removed is None:
        return
    inputs = removed.get("inputs", {})
    for node in graph.values():
        for key, value in node.get("inputs", {}).items():
            if _links_to(value, bypass.node):
                node["inputs"][key] = copy.deepcopy(inputs.get(bypass.through.get(int(value[1]), ""), value))


def _links_to(value: Any, node: str) -> bool:
    return isinstance(value, list) and len(value) == 2 and str(value[0]) == node and isinstance(value[1], int)


def _number(value: Any, whole: bool) -> int | float:
    original = value
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text) if whole and re.fullmatch(r"[+-]?\d+", text) else float(text)
        except ValueError:
            raise ValueError(f"{_shown(original)} is not {'a whole number' if whole else 'a number'}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{_shown(original)} is not {'a whole number' if whole else 'a number'}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer past what a float holds
        finite = whole
    if not finite:
        raise ValueError(f"{_shown(original)} is not a finite number")
    if whole:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{_shown(original)} is not a whole number")
        return int(value)
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{_shown(original)} is not a finite number") from None


def _bound(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TemplateError(f"{where}: must be a finite number")
    return value


def _bypass(value: Any, where: str) -> Bypass:
    shaped = isinstance(value, dict) and isinstance(value.get("node"), str) and isinstance(value.get("through"), dict)
    if not shaped:
        raise TemplateError(f'{where}: must be {{"node": NODE_ID, "through": {{"0": INPUT, ...}}}}')
    through: dict[int, str] = {}
    for slot, name in value["through"].items():
        if not str(slot).isdigit() or not isinstance(name, str):
            raise TemplateError(f"{where}.through: output slots are numbers, each naming an input")
        through[int(slot)] = name
    return Bypass(value["node"], through)


def _listed(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise TemplateError(f"{where}: must be a list")
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise TemplateError(f"{where}: must be text")
    return value


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _plain(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)
