"""Checking an API-format prompt before it runs, with ComfyUI's error types and `node_errors` shape.

Order and semantics follow ComfyUI's `validate_prompt`: every node needs a known `class_type`; only
nodes reachable from output nodes are checked; each declared input is checked for presence, link
shape and type, value type, range and list membership; a prompt with at least one good output runs
those outputs and reports the others. Unlike ComfyUI, a link to a missing node or output and a
dependency cycle are reported on the node that holds the link (ComfyUI raises there and files it as
`exception_during_inner_validation`, the type used here too), and nothing here raises for any JSON.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from zimage_serve.limits import MAX_SIDE, MIN_SIDE, WHAT, Limits, flag
from zimage_serve.workflow.context import ResourceLists
from zimage_serve.workflow.spec import (
    Autogrow,
    Boolean,
    Combo,
    DynamicCombo,
    Float,
    Input,
    Int,
    Link,
    Node,
    SizedNode,
    String,
    prompt_inputs,
)

MAX_LISTED_CHOICES = 20


@dataclass
class ValidationResult:
    prompt: dict[str, Any]  # a copy with constants coerced and {"__value__": ...} unwrapped
    outputs: list[str]  # the output nodes that passed, in prompt order
    node_errors: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: dict[str, Any] | None = None  # set when nothing can run (the 400 answer's "error")

    @property
    def ok(self) -> bool:
        return self.error is None

    def describe(self) -> str:
        """The problems as lines a person reads: the error, then each node's (for the command line)."""
        lines = [str(self.error["message"]) if self.error else "some outputs failed validation"]
        for node_id, entry in self.node_errors.items():
            for reason in entry["errors"]:
                lines.append(f"  node {node_id} ({entry['class_type']}): {reason['message']}: {reason['details']}")
        if self.error and not self.node_errors and self.error.get("details"):
            lines.append(f"  {self.error['details']}")
        return "\n".join(lines)


def error(kind: str, message: str, details: str = "", extra_info: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra_info or {}}


def error_body(
    kind: str,
    message: str,
    details: str = "",
    extra_info: dict[str, Any] | None = None,
    node_errors: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """ComfyUI's answer to a prompt it refuses, `{"error": {...}, "node_errors": {...}}`: the one shape of
    every error the server gives outside the file and user-data routes."""
    return {"error": error(kind, message, details, extra_info), "node_errors": node_errors or {}}


def is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2


def link_source(value: list[Any]) -> tuple[str, int] | None:
    """(node id, output index) of a well-formed link, else None."""
    node, index = value
    if isinstance(node, bool) or not isinstance(node, str | int):
        return None
    if isinstance(index, bool) or not isinstance(index, int):
        return None
    return str(node), index


def types_match(received: str, expected: Any) -> bool:
    if not isinstance(expected, str):
        return False
    if received == expected or "*" in (received, expected):
        return True
    return bool({t.strip() for t in received.split(",")} & {t.strip() for t in expected.split(",")})


class TokenCounter(Protocol):
    def count(self, prompt: dict[str, Any], node_id: str, text: str, within: int) -> int | None: ...


class Validator:
    """Checks prompts against the node set, the files in `lists` and the `limits` (the tokens of prompt
    texts counted by `tokens`, when given)."""

    def __init__(
        self,
        nodes: Mapping[str, type[Node]],
        lists: ResourceLists,
        limits: Limits | None = None,
        tokens: TokenCounter | None = None,
    ) -> None:
        self.nodes, self.lists = nodes, lists
        self.limits, self.tokens = limits or Limits(), tokens

    def scoped(self, lists: ResourceLists | None = None, limits: Limits | None = None) -> Validator:
        """This validator for one caller: their own files and limits, the node set and tokenizer shared."""
        if (lists is None or lists is self.lists) and (limits is None or limits is self.limits):
            return self
        return Validator(self.nodes, lists or self.lists, limits or self.limits, self.tokens)

    def validate(self, prompt: Any, partial_targets: list[str] | None = None) -> ValidationResult:
        if not isinstance(prompt, dict) or not prompt:
            return ValidationResult(
                {}, [], error=error("invalid_prompt", "The prompt must be a non-empty object of nodes", "prompt")
            )
        if len(prompt) > self.limits.nodes:
            message = self.limits.refusal("nodes", len(prompt))
            return ValidationResult({}, [], error=error("invalid_prompt", message, "prompt", {"limit": "nodes"}))
        # Validation converts input values in place: it works on its own nodes and inputs (the values in them
        # are replaced, never changed, so they need no copy: a deep copy cost more than the checks).
        prompt = {node_id: _own_node(node) for node_id, node in prompt.items()}
        for node_id, node in prompt.items():
            problem = self._node_problem(str(node_id), node)
            if problem is not None:
                return ValidationResult(prompt, [], error=problem)

        outputs = [nid for nid, node in prompt.items() if self.nodes[node["class_type"]].output_node]
        if partial_targets is not None:
            wanted = {str(t) for t in partial_targets}
            outputs = [nid for nid in outputs if nid in wanted]
        if not outputs:
            return ValidationResult(prompt, [], error=error("prompt_no_outputs", "Prompt has no outputs"))

        reach = {o: self._reachable(prompt, o) for o in outputs}
        checked = set().union(*reach.values())
        reasons: dict[str, list[dict[str, Any]]] = {nid: self._check_inputs(prompt, nid) for nid in checked}
        for nid, reason in self._cycles(prompt, checked).items():
            reasons[nid].append(reason)

        good: list[str] = []
        node_errors: dict[str, dict[str, Any]] = {}
        for output in outputs:
            failing = [nid for nid in reach[output] if reasons[nid]]
            if not failing:
                good.append(output)
                continue
            for nid in sorted(failing, key=list(prompt).index):
                entry = node_errors.setdefault(
                    nid,
                    {"errors": reasons[nid], "dependent_outputs": [], "class_type": prompt[nid]["class_type"]},
                )
                entry["dependent_outputs"].append(output)
        if not good:
            lines = [f"{r['message']}: {r['details']}" for entry in node_errors.values() for r in entry["errors"]]
            failed = error("prompt_outputs_failed_validation", "Prompt outputs failed validation", "\n".join(lines))
            return ValidationResult(prompt, [], node_errors, failed)
        return ValidationResult(prompt, good, node_errors)

    # -- step 1: every node ------------------------------------------------------------------------
    def _node_problem(self, node_id: str, node: Any) -> dict[str, Any] | None:
        if not isinstance(node, dict) or "class_type" not in node:
            return error(
                "invalid_prompt",
                "Cannot execute because a node is missing the class_type property.",
                f"Node ID '#{node_id}'",
            )
        class_type = node["class_type"]
        if not isinstance(class_type, str) or class_type not in self.nodes:
            # Current ComfyUI's answer; the frontend reads extra_info to name the node that is missing.
            meta = node.get("_meta")
            title = meta.get("title") if isinstance(meta, dict) else None
            named = class_type if isinstance(class_type, str) else None
            shown = (named if named is not None else repr(class_type))[:200]
            return error(
                "missing_node_type",
                f"Node '{shown}' not found. The custom node may not be installed.",
                f"Node ID '#{node_id}'",
                {"node_id": node_id, "class_type": named, "node_title": title if isinstance(title, str) else named},
            )
        inputs = node.setdefault("inputs", {})
        if not isinstance(inputs, dict):
            return error(
                "invalid_prompt", "Cannot execute because a node's inputs are not an object.", f"Node ID '#{node_id}'"
            )
        return None

    # -- step 2: what each output needs ----------------------------------------------------------------
    def _links(self, prompt: dict[str, Any], node_id: str) -> list[str]:
        node_class = self.nodes[prompt[node_id]["class_type"]]
        found = []
        given = prompt[node_id]["inputs"]
        for name in node_class.inputs_for(given):
            value = given.get(name)
            if is_link(value) and (source := link_source(value)) is not None and source[0] in prompt:
                found.append(source[0])
        return found

    def _reachable(self, prompt: dict[str, Any], start: str) -> set[str]:
        seen, stack = {start}, [start]
        while stack:
            for source in self._links(prompt, stack.pop()):
                if source not in seen:
                    seen.add(source)
                    stack.append(source)
        return seen

    def _cycles(self, prompt: dict[str, Any], nodes: set[str]) -> dict[str, dict[str, Any]]:
        """Nodes whose links lead back to themselves, each with an error naming the loop."""
        found: dict[str, dict[str, Any]] = {}
        state: dict[str, int] = {}  # 1 = on the current path, 2 = done
        for root in sorted(nodes):
            if root in state:
                continue
            path: list[str] = []
            stack: list[tuple[str, list[str]]] = [(root, self._links(prompt, root))]
            state[root] = 1
            path.append(root)
            while stack:
                node, pending = stack[-1]
                if not pending:
                    stack.pop()
                    path.pop()
                    state[node] = 2
                    continue
                source = pending.pop()
                if state.get(source) == 1:
                    loop = [*path[path.index(source) :], source]
                    for member in loop[:-1]:
                        found.setdefault(
                            member,
                            error(
                                "exception_during_inner_validation",
                                "Exception when validating inner node",
                                "dependency cycle: " + " → ".join(loop),
                                {"exception_type": "graph.DependencyCycleError", "cycle": loop},
                            ),
                        )
                elif source not in state:
                    state[source] = 1
                    path.append(source)
                    stack.append((source, self._links(prompt, source)))
        return found

    # -- step 3: one node's inputs ---------------------------------------------------------------------
    def _check_inputs(self, prompt: dict[str, Any], node_id: str) -> list[dict[str, Any]]:
        node = prompt[node_id]
        node_class = self.nodes[node["class_type"]]
        inputs: dict[str, Any] = node["inputs"]
        reasons: list[dict[str, Any]] = []
        constants: dict[str, Any] = {}
        top_level = node_class.all_inputs()
        for name, declared in node_class.inputs_for(inputs).items():
            if isinstance(declared, Autogrow):  # its members are checked one by one
                continue
            owner = top_level.get(name.split(".", 1)[0]) if "." in name else None
            if name not in inputs and isinstance(owner, DynamicCombo) and declared.is_widget():
                inputs[name] = default_of(declared, self.lists)  # an option's widget left out: ComfyUI's default
            if name not in inputs:
                first = isinstance(owner, Autogrow) and owner.required(name.split(".", 1)[0], name)
                option_link = isinstance(owner, DynamicCombo)  # an option's link input: it must be given
                if name in node_class.required or first or option_link:
                    reasons.append(
                        error("required_input_missing", "Required input is missing", name, {"input_name": name})
                    )
                continue
            value = inputs[name]
            if is_link(value) or isinstance(value, list):
                reason = self._check_link(prompt, name, declared, value)
                if reason is not None:
                    reasons.append(reason)
                continue
            if isinstance(declared, Link):
                reasons.append(
                    error(
                        "bad_linked_input",
                        "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                        name,
                        {"input_name": name, "input_config": self._config(declared), "received_value": _shown(value)},
                    )
                )
                continue
            converted, reason = self._convert(name, declared, value)
            if reason is not None:
                reasons.append(reason)
                continue
            inputs[name] = converted
            constants[name] = converted
            if name in node_class.custom_checks:
                continue
            reason = self._check_value(name, declared, converted)
            if reason is not None:
                reasons.append(reason)
        if not reasons and constants:
            reasons.extend(self._check_limits(prompt, node_id, node_class, constants))
        if node_class.custom_checks and not reasons:
            for name in node_class.custom_checks:
                if name not in constants:
                    continue
                message = node_class.check(self.lists, self.limits, **constants)
                if message is not None:
                    reasons.append(
                        error(
                            "custom_validation_failed",
                            "Custom validation failed for node",
                            f"{name} - {message}",
                            {
                                "input_name": name,
                                "input_config": declared_config(node_class, name, self.lists),
                                "received_value": constants[name],
                            },
                        )
                    )
                    break
        return reasons

    def _check_limits(
        self, prompt: dict[str, Any], node_id: str, node_class: type[Node], constants: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """The server's limits on what the node's constants ask for: pixels, batch, steps, prompt length."""
        demands = node_class.demands(**constants)
        for name in prompt_inputs(node_class):
            text = constants.get(name)
            if isinstance(text, str):
                size = len(text.encode("utf-8"))
                demands.append(("prompt_bytes", name, size))
                if self.tokens is not None and size <= self.limits.prompt_bytes:
                    counted = self.tokens.count(prompt, node_id, text, self.limits.prompt_tokens)
                    if counted is not None:
                        demands.append(("prompt_tokens", name, counted))
        reasons = []
        for limit, name, amount in demands:
            allowed: int = getattr(self.limits, limit)
            if amount > allowed:
                token = limit in self.limits.capped
                whose = f"token {self.limits.token!r}'s" if token else "this server's"
                reasons.append(
                    error(
                        "value_bigger_than_max",
                        f"{WHAT[limit].capitalize()}: {amount:,} is more than {whose} limit of {allowed:,}",
                        f"{name} (max_{limit} of the token)" if token else f"{name} ({flag(limit)})",
                        {"input_name": name, "limit": limit, "limit_value": allowed, "received_value": amount},
                    )
                )
        if issubclass(node_class, SizedNode):  # a drawn latent's sides: the bounds every route shares
            for name, value, why in node_class.side_refusals(**constants):
                bound, kind = (MAX_SIDE, "bigger_than_max") if value > MAX_SIDE else (MIN_SIDE, "smaller_than_min")
                reasons.append(
                    error(
                        f"value_{kind}",
                        f"{name.capitalize()}: {why}",
                        name,
                        {"input_name": name, "limit": "side", "limit_value": bound, "received_value": value},
                    )
                )
        return reasons

    def _config(self, declared: Input) -> list[Any]:
        """An input's object_info entry, for error messages (a combo's lists its choices: built only then)."""
        return declared.spec(self.lists)

    def _check_link(self, prompt: dict[str, Any], name: str, declared: Input, value: Any) -> dict[str, Any] | None:
        source = link_source(value) if is_link(value) else None
        if source is not None and source[0] in prompt:
            source_id, index = source
            source_class = self.nodes[prompt[source_id]["class_type"]]
            if 0 <= index < len(source_class.outputs):
                received = source_class.outputs[index].type
                expected = declared.spec_type(self.lists)
                if types_match(received, expected):
                    return None
                return error(
                    "return_type_mismatch",
                    "Return type mismatch between linked nodes",
                    f"{name}, received_type({received}) mismatch input_type"
                    f"({expected if isinstance(expected, str) else 'COMBO'})",
                    {
                        "input_name": name,
                        "input_config": self._config(declared),
                        "received_type": received,
                        "linked_node": [source_id, index],
                    },
                )
        extra = {"input_name": name, "input_config": self._config(declared), "received_value": _shown(value)}
        if source is None:
            return error(
                "bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]", name, extra
            )
        source_id, index = source
        if source_id not in prompt:
            return error(
                "exception_during_inner_validation",
                "Exception when validating inner node",
                f"{name}: linked node '{source_id}' does not exist in the prompt",
                {**extra, "linked_node": [source_id, index], "exception_type": "KeyError"},
            )
        source_class = self.nodes[prompt[source_id]["class_type"]]
        return error(
            "exception_during_inner_validation",
            "Exception when validating inner node",
            f"{name}: node '{source_id}' ({prompt[source_id]['class_type']}) has no output {index}; it has "
            f"{len(source_class.outputs)}",
            {**extra, "linked_node": [source_id, index], "exception_type": "IndexError"},
        )

    def _convert(self, name: str, declared: Input, value: Any) -> tuple[Any, dict[str, Any] | None]:
        if isinstance(value, dict) and "__value__" in value:
            value = value["__value__"]
        kind = {Int: "INT", Float: "FLOAT", String: "STRING", Boolean: "BOOLEAN"}.get(type(declared))
        try:
            if kind == "INT":
                if isinstance(value, dict | list) or value is None:
                    raise ValueError(f"{value!r} is not a number")
                converted: Any = int(value)
            elif kind == "FLOAT":
                if isinstance(value, dict | list) or value is None:
                    raise ValueError(f"{value!r} is not a number")
                converted = float(value)
                if not math.isfinite(converted):
                    raise ValueError(f"{value!r} is not a finite number")
            elif kind == "STRING":
                if isinstance(value, dict | list) or value is None:
                    raise ValueError(f"{value!r} is not text")
                converted = str(value)
            elif kind == "BOOLEAN":
                if not isinstance(value, bool | int):
                    raise ValueError(f"{value!r} is not a boolean")
                converted = bool(value)
            else:
                if not isinstance(value, str | int | float) or isinstance(value, bool):
                    raise ValueError(f"{value!r} is not one of the choices")
                converted = value
        except (ValueError, TypeError, OverflowError) as exc:
            type_name = kind or "COMBO"
            return None, error(
                "invalid_input_type",
                f"Failed to convert an input value to a {type_name} value",
                f"{name}, {_shown(value)}, {exc}",
                {
                    "input_name": name,
                    "input_config": self._config(declared),
                    "received_value": _shown(value),
                    "exception_message": str(exc),
                },
            )
        return converted, None

    def _check_value(self, name: str, declared: Input, value: Any) -> dict[str, Any] | None:
        if isinstance(declared, Int | Float) and not declared.min <= value <= declared.max:
            extra = {"input_name": name, "input_config": self._config(declared), "received_value": value}
            if value < declared.min:
                return error("value_smaller_than_min", f"Value {value} smaller than min of {declared.min}", name, extra)
            return error("value_bigger_than_max", f"Value {value} bigger than max of {declared.max}", name, extra)
        if isinstance(declared, Combo | DynamicCombo):
            choices = declared.values(self.lists) if isinstance(declared, Combo) else declared.keys()
            if value not in choices:
                listed = f"(list of length {len(choices)})" if len(choices) > MAX_LISTED_CHOICES else str(choices)
                shown_config = None if len(choices) > MAX_LISTED_CHOICES else self._config(declared)
                return error(
                    "value_not_in_list",
                    "Value not in list",
                    f"{name}: '{value}' not in {listed}",
                    {"input_name": name, "input_config": shown_config, "received_value": value},
                )
        return None


def declared_config(node_class: type[Node], name: str, lists: ResourceLists) -> list[Any]:
    return node_class.all_inputs()[name].spec(lists)


def default_of(declared: Input, lists: ResourceLists) -> Any:
    """What an input is when a graph leaves it out: its default, or a list's first choice."""
    if isinstance(declared, Combo) and declared.default is None:
        choices = declared.values(lists)
        return choices[0] if choices else None
    if isinstance(declared, DynamicCombo):
        return declared.fallback()
    return getattr(declared, "default", None)


def _own_node(node: Any) -> Any:
    """A node (and its inputs) that validation may change without touching the caller's."""
    if not isinstance(node, dict):
        return node
    own = dict(node)
    if isinstance(own.get("inputs"), dict):
        own["inputs"] = dict(own["inputs"])
    return own


def _shown(value: Any) -> Any:
    """A received value as it can be echoed back in JSON (bounded)."""
    text = value if isinstance(value, str | int | float | bool) or value is None else repr(value)
    if isinstance(text, str) and len(text) > 200:
        return text[:200] + "…"
    return text
