"""UI-format workflows (what ComfyUI's "Save" writes: nodes, links, widget values) to API format.

Does what the frontend's `graphToPrompt` does before it queues: positional `widgets_values` become named
inputs (skipping the extra control value after seed-like widgets), links become `[source id, slot]`,
subgraphs are flattened with `<instance>:<inner>` ids, muted nodes (mode 2) are dropped, bypassed nodes
(mode 4) are routed around, and virtual nodes (Reroute, PrimitiveNode, notes) are resolved away.

Subgraphs multiply: a definition holding four instances of the next, nested ten deep, is a few kilobytes
that flatten to a million nodes. So the nodes a workflow flattens to are counted from its definitions
first (each definition once), and a workflow over the node limit is refused before any node is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from zimage_serve.errors import ZImageError
from zimage_serve.limits import Limits
from zimage_serve.workflow.spec import Combo, DynamicCombo, Int, Node

MODE_NEVER, MODE_BYPASS = 2, 4
NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
SUBGRAPH_INPUT, SUBGRAPH_OUTPUT = -10, -20
MAX_SUBGRAPH_DEPTH = 16  # subgraphs within subgraphs; ComfyUI's own templates nest two deep


class WorkflowFormatError(ZImageError):
    """A workflow file that is neither API nor UI format, or a UI file that is malformed."""


class WorkflowTooLarge(WorkflowFormatError):
    """A UI-format workflow that would flatten to more nodes, or nest subgraphs deeper, than allowed."""


def is_api_format(data: Any) -> bool:
    return (
        isinstance(data, dict) and bool(data) and all(isinstance(v, dict) and "class_type" in v for v in data.values())
    )


def is_ui_format(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list)


def to_api(data: Any, nodes: Mapping[str, type[Node]], limits: Limits | None = None) -> dict[str, Any]:
    """An API-format prompt from either format (API format is returned as is). A UI-format workflow that
    would flatten to more than `limits.nodes` nodes is refused before it is flattened."""
    if is_api_format(data):
        return dict(data)
    if not is_ui_format(data):
        raise WorkflowFormatError(
            "not a ComfyUI workflow: expected an API-format prompt (an object of nodes with class_type) or a "
            "UI-format workflow (with a nodes list)"
        )
    try:
        converter = _Converter(data, nodes)
        flattened = converter.count()
        allowed = limits or Limits()
        if flattened > allowed.nodes:
            raise WorkflowTooLarge(f"the workflow flattens to {allowed.refusal('nodes', flattened)}")
        return converter.convert()
    except WorkflowFormatError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
        raise WorkflowFormatError(f"malformed UI-format workflow: {type(exc).__name__}: {exc}") from exc


@dataclass
class _Flat:
    """A node of the flattened graph."""

    id: str
    type: str
    mode: int
    title: str | None
    widgets_values: Any
    inputs: list[dict[str, Any]]  # each: name, widget?, and `source` resolved to a flat (id, slot) or None
    sources: dict[int, tuple[str, int] | None] = field(default_factory=dict)


class _Converter:
    def __init__(self, workflow: dict[str, Any], nodes: Mapping[str, type[Node]]) -> None:
        self.workflow, self.classes = workflow, nodes
        definitions = workflow.get("definitions") or {}
        subgraphs = definitions.get("subgraphs") if isinstance(definitions, dict) else None
        self.subgraphs: dict[str, dict[str, Any]] = {
            str(s["id"]): s for s in subgraphs or [] if isinstance(s, dict) and "id" in s
        }
        self.flat: dict[str, _Flat] = {}
        # (subgraph instance flat id, output slot) → the inner (flat id, slot) that produces it
        self.instance_outputs: dict[tuple[str, int], tuple[str, int] | None] = {}

    # -- counting --------------------------------------------------------------------------------------
    def count(self) -> int:
        """The nodes flattening would make (subgraph instances replaced by their contents), from each
        definition's count worked out once: milliseconds however far the instances multiply."""
        counts: dict[str, int] = {}

        def nodes_in(graph: dict[str, Any], depth: int, inside: tuple[str, ...]) -> int:
            if depth > MAX_SUBGRAPH_DEPTH:
                raise WorkflowTooLarge(f"subgraphs are nested more than {MAX_SUBGRAPH_DEPTH} deep")
            nodes = graph.get("nodes")
            if not isinstance(nodes, list):
                raise WorkflowFormatError("a graph's 'nodes' must be a list")
            total = 0
            for raw in nodes:
                kind = str(raw.get("type")) if isinstance(raw, dict) else None
                if kind not in self.subgraphs:
                    total += 1
                    continue
                if kind in inside:
                    raise WorkflowFormatError(f"subgraph {kind} contains itself")
                if kind not in counts:
                    counts[kind] = nodes_in(self.subgraphs[kind], depth + 1, (*inside, kind))
                total += counts[kind]
            return total

        return nodes_in(self.workflow, 0, ())

    # -- flattening ------------------------------------------------------------------------------------
    def convert(self) -> dict[str, Any]:
        self._add_graph(self.workflow, prefix="", outside=None, depth=0)
        prompt: dict[str, Any] = {}
        for node in self.flat.values():
            if node.type in self.subgraphs or node.mode in (MODE_NEVER, MODE_BYPASS) or self._virtual(node):
                continue
            prompt[node.id] = self._api_node(node)
        return prompt

    def _add_graph(
        self,
        graph: dict[str, Any],
        prefix: str,
        outside: dict[str, tuple[str, int] | None] | None,
        depth: int,
    ) -> None:
        """Add one graph's nodes; `outside` maps a subgraph input name to what feeds it from outside."""
        if depth > MAX_SUBGRAPH_DEPTH:  # counted before: a guard for callers that did not count
            raise WorkflowTooLarge(f"subgraphs are nested more than {MAX_SUBGRAPH_DEPTH} deep")
        nodes = graph.get("nodes")
        if not isinstance(nodes, list):
            raise WorkflowFormatError("a graph's 'nodes' must be a list")
        raw_links = graph.get("links")
        links = self._links([] if raw_links is None else raw_links)
        declared_inputs = graph.get("inputs")
        subgraph_inputs = (
            [i.get("name") for i in declared_inputs if isinstance(i, dict)] if isinstance(declared_inputs, list) else []
        )
        local: dict[str, _Flat] = {}
        for raw in nodes:
            if not isinstance(raw, dict) or "id" not in raw or "type" not in raw:
                raise WorkflowFormatError(f"a node needs an id and a type: {str(raw)[:80]}")
            flat_id = f"{prefix}{raw['id']}"
            node = _Flat(
                id=flat_id,
                type=str(raw["type"]),
                mode=int(raw.get("mode") or 0),
                title=raw.get("title"),
                widgets_values=raw.get("widgets_values"),
                inputs=[i for i in raw.get("inputs") or [] if isinstance(i, dict)]
                if isinstance(raw.get("inputs"), list)
                else [],
            )
            local[str(raw["id"])] = node
            self.flat[flat_id] = node
        for target_id, slot, origin_id, origin_slot in links:
            target = local.get(target_id)
            if target_id == str(SUBGRAPH_OUTPUT):
                instance = prefix.rstrip(":")
                self.instance_outputs[(instance, slot)] = self._local_source(
                    local, prefix, origin_id, origin_slot, subgraph_inputs, outside
                )
                continue
            if target is None:
                continue
            target.sources[slot] = self._local_source(local, prefix, origin_id, origin_slot, subgraph_inputs, outside)
        for node in list(local.values()):
            if node.type in self.subgraphs:
                self._expand(node, depth)

    def _local_source(
        self,
        local: dict[str, _Flat],
        prefix: str,
        origin_id: str,
        origin_slot: int,
        subgraph_inputs: list[Any],
        outside: dict[str, tuple[str, int] | None] | None,
    ) -> tuple[str, int] | None:
        if origin_id == str(SUBGRAPH_INPUT):
            if outside is None or not 0 <= origin_slot < len(subgraph_inputs):
                return None
            return outside.get(str(subgraph_inputs[origin_slot]))
        if origin_id not in local:
            return None
        return (f"{prefix}{origin_id}", origin_slot)

    def _expand(self, instance: _Flat, depth: int) -> None:
        definition = self.subgraphs[instance.type]
        outside = {
            str(spec.get("name")): instance.sources.get(index)
            for index, spec in enumerate(instance.inputs)
            if instance.sources.get(index) is not None
        }
        self._add_graph(definition, prefix=f"{instance.id}:", outside=outside, depth=depth + 1)

    @staticmethod
    def _links(raw_links: Any) -> list[tuple[str, int, str, int]]:
        """(target id, target slot, origin id, origin slot) from either link encoding."""
        if not isinstance(raw_links, list):
            raise WorkflowFormatError("'links' must be a list")
        found = []
        for link in raw_links:
            try:
                if isinstance(link, list):
                    _, origin, origin_slot, target, target_slot = link[:5]
                elif isinstance(link, dict):
                    origin, origin_slot = link["origin_id"], link["origin_slot"]
                    target, target_slot = link["target_id"], link["target_slot"]
                else:
                    raise TypeError
                found.append((str(target), int(target_slot), str(origin), int(origin_slot)))
            except (TypeError, ValueError, KeyError, IndexError) as exc:
                raise WorkflowFormatError(f"malformed link {str(link)[:80]}") from exc
        return found

    # -- resolving sources through virtual, bypassed and subgraph nodes ----------------------------------
    def _virtual(self, node: _Flat) -> bool:
        return node.type in ("Reroute", "PrimitiveNode") or node.type in NOTE_TYPES

    def _resolve(self, source: tuple[str, int] | None, wanted: str | None, hops: int = 0) -> Any:
        """A link target's real source: ("link", id, slot), ("value", v) for a primitive, or None."""
        if source is None or hops > 256:
            return None
        node_id, slot = source
        node = self.flat.get(node_id)
        if node is None:
            return None
        if node.type in self.subgraphs:
            return self._resolve(self.instance_outputs.get((node_id, slot)), wanted, hops + 1)
        if node.mode == MODE_NEVER:
            return None
        if node.type == "Reroute":
            return self._resolve(node.sources.get(0), wanted, hops + 1)
        if node.type == "PrimitiveNode":
            values = node.widgets_values if isinstance(node.widgets_values, list) else []
            return ("value", values[0]) if values else None
        if node.mode == MODE_BYPASS:
            return self._resolve(self._bypass_source(node, slot, wanted), wanted, hops + 1)
        return ("link", node_id, slot)

    def _bypass_source(self, node: _Flat, slot: int, wanted: str | None) -> tuple[str, int] | None:
        """The input a bypassed node passes through: same slot if its type fits, else the first that fits."""

        def fits(index: int) -> bool:
            declared = node.inputs[index].get("type") if index < len(node.inputs) else None
            return wanted is None or declared is None or str(declared) == wanted

        if slot < len(node.inputs) and fits(slot) and node.sources.get(slot) is not None:
            return node.sources[slot]
        for index in range(len(node.inputs)):
            if fits(index) and node.sources.get(index) is not None:
                return node.sources[index]
        return None

    # -- one API node ------------------------------------------------------------------------------------
    def _api_node(self, node: _Flat) -> dict[str, Any]:
        inputs: dict[str, Any] = {}
        node_class = self.classes.get(node.type)
        if node_class is not None:
            inputs.update(self._widget_inputs(node, node_class))
        for index, spec in enumerate(node.inputs):
            name = spec.get("name")
            if not isinstance(name, str):
                continue
            resolved = self._resolve(node.sources.get(index), spec.get("type"))
            if resolved is None:
                continue
            if resolved[0] == "value":
                inputs[name] = resolved[1]
            else:
                inputs[name] = [resolved[1], resolved[2]]
        meta = {"title": node.title or (node_class.display_name if node_class else None) or node.type}
        return {"inputs": inputs, "class_type": node.type, "_meta": meta}

    @staticmethod
    def _widget_inputs(node: _Flat, node_class: type[Node]) -> dict[str, Any]:
        values = node.widgets_values
        declared = [(n, i) for n, i in node_class.all_inputs().items() if i.is_widget()]
        if isinstance(values, dict):
            return {n: values[n] for n, _ in declared if n in values}
        if not isinstance(values, list):
            return {}
        named: dict[str, Any] = {}
        position = 0
        pending = list(declared)
        while pending and position < len(values):
            name, spec = pending.pop(0)
            value = values[position]
            named[name] = {"__value__": value} if isinstance(value, list) else value
            position += 1
            if isinstance(spec, DynamicCombo) and (chosen := spec.option(value)) is not None:
                # the chosen option's widgets follow it, under dotted names (as the frontend adds them)
                widgets = [(f"{name}.{sub}", i) for sub, i in chosen.inputs.items() if i.is_widget()]
                pending[:0] = widgets
            elif isinstance(spec, Int) and spec.control_after_generate:
                position += 1  # the "randomize"/"fixed" control value the frontend does not send
            elif (
                isinstance(spec, Combo)
                and spec.options.get("image_upload")
                and position < len(values)
                and values[position] in ("image", None)  # the upload button's placeholder value
            ):
                position += 1
        return named
