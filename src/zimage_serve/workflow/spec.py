"""How a node declares itself, and the `object_info` entry generated from that declaration.

A node class lists its inputs as typed fields (`Int`, `Float`, `String`, `Boolean`, `Combo`, `Link`),
its outputs, category and whether it is an output node; `node_info` renders exactly the shape ComfyUI's
`GET /object_info` returns, so the official frontend and API clients read our nodes as theirs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from zimage_serve.limits import Limits
    from zimage_serve.workflow.context import NodeContext, ResourceLists

LINK_TYPES = (
    *("MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT", "IMAGE", "MASK", "MODEL_PATCH", "UPSCALE_MODEL"),
    *("SAMPLER", "SIGMAS", "NOISE", "GUIDER"),  # custom sampling's parts
)
MAX_SEED = 0xFFFF_FFFF_FFFF_FFFF
MAX_RESOLUTION = 16384


@dataclass(frozen=True)
class Input:
    """One declared input. `options` are the extra keys ComfyUI's frontend understands."""

    tooltip: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    type_name: ClassVar[str] = ""

    def is_widget(self) -> bool:
        return True

    def spec_type(self, lists: ResourceLists) -> Any:
        return self.type_name

    def spec_options(self) -> dict[str, Any]:
        return {}

    def spec(self, lists: ResourceLists) -> list[Any]:
        options = self.spec_options()
        options.update(self.options)
        if self.tooltip:
            options["tooltip"] = self.tooltip
        return [self.spec_type(lists), options] if options else [self.spec_type(lists)]


@dataclass(frozen=True)
class Int(Input):
    default: int = 0
    min: int = -(2**63)
    max: int = 2**63 - 1
    step: int = 1
    control_after_generate: bool = False
    limit: str | None = None  # the `Limits` field this value counts against (steps, batch)

    type_name: ClassVar[str] = "INT"

    def spec_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"default": self.default, "min": self.min, "max": self.max, "step": self.step}
        if self.control_after_generate:
            options["control_after_generate"] = True
        return options


@dataclass(frozen=True)
class Float(Input):
    default: float = 0.0
    min: float = -1e300
    max: float = 1e300
    step: float = 0.01
    round: float | None = None

    type_name: ClassVar[str] = "FLOAT"

    def spec_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"default": self.default, "min": self.min, "max": self.max, "step": self.step}
        if self.round is not None:
            options["round"] = self.round
        return options


@dataclass(frozen=True)
class String(Input):
    default: str = ""
    multiline: bool = False
    dynamic_prompts: bool = False
    prompt: bool = False  # a text the encoder reads: its bytes and tokens count against the limits

    type_name: ClassVar[str] = "STRING"

    def spec_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"default": self.default}
        if self.multiline:
            options["multiline"] = True
            options["dynamicPrompts"] = self.dynamic_prompts
        return options


@dataclass(frozen=True)
class Boolean(Input):
    default: bool = False

    type_name: ClassVar[str] = "BOOLEAN"

    def spec_options(self) -> dict[str, Any]:
        return {"default": self.default}


@dataclass(frozen=True)
class Combo(Input):
    """A choice from a fixed list, or from a list read from disk when asked (`resource` names it)."""

    choices: tuple[str, ...] = ()
    resource: str | None = None  # e.g. "diffusion_models", "loras", "input_images"
    default: str | None = None

    type_name: ClassVar[str] = "COMBO"

    def values(self, lists: ResourceLists) -> list[str]:
        if self.resource is not None:
            return lists.names(self.resource)
        return list(self.choices)

    def spec_type(self, lists: ResourceLists) -> Any:
        return self.values(lists)

    def spec_options(self) -> dict[str, Any]:
        return {"default": self.default} if self.default is not None else {}


@dataclass(frozen=True)
class Link(Input):
    """An input that only takes a link from another node's output of this type."""

    link_type: str = ""

    def is_widget(self) -> bool:
        return False

    def spec_type(self, lists: ResourceLists) -> Any:
        return self.link_type


@dataclass(frozen=True)
class DynamicOption:
    """One choice of a `DynamicCombo` and the inputs that come with it."""

    key: str
    inputs: Mapping[str, Input] = field(default_factory=dict)


@dataclass(frozen=True)
class DynamicCombo(Input):
    """ComfyUI's V3 DynamicCombo: a choice whose option brings inputs of its own. An API-format graph sends
    them beside it under dotted names (`format`: "png", `format.bit_depth`: "8-bit"); the node receives
    them nested, as ComfyUI's V3 nodes do: `format={"format": "png", "bit_depth": "8-bit"}`."""

    choices: tuple[DynamicOption, ...] = ()
    default: str | None = None

    type_name: ClassVar[str] = "COMFY_DYNAMICCOMBO_V3"

    def keys(self) -> list[str]:
        return [choice.key for choice in self.choices]

    def option(self, key: Any) -> DynamicOption | None:
        return next((choice for choice in self.choices if choice.key == key), None)

    def fallback(self) -> str | None:
        """What it is when a graph leaves it out: its default, else its first choice."""
        return self.default if self.default is not None else next((c.key for c in self.choices), None)

    def spec_options(self) -> dict[str, Any]:
        return {"default": self.default} if self.default is not None else {}

    def spec(self, lists: ResourceLists) -> list[Any]:
        options = self.spec_options()
        options["options"] = [
            {"key": choice.key, "inputs": {"required": {k: v.spec(lists) for k, v in choice.inputs.items()}}}
            for choice in self.choices
        ]
        options.update(self.options)
        if self.tooltip:
            options["tooltip"] = self.tooltip
        return [self.type_name, options]


@dataclass(frozen=True)
class Autogrow(Input):
    """ComfyUI's V3 Autogrow: as many copies of one input as the user connects, `min` of them required and
    at most `max`, named `<prefix><n>` from 0. An API-format graph sends them under dotted names
    (`images.image0`, `images.image1`); the node receives them as a dict in order (`images={"image0": ...}`)."""

    member: Input = field(default_factory=Input)
    member_name: str = ""  # the template input's own name (its label in the frontend)
    prefix: str = ""
    min: int = 1
    max: int = 50

    type_name: ClassVar[str] = "COMFY_AUTOGROW_V3"

    def is_widget(self) -> bool:
        return False

    def members(self, name: str) -> list[str]:
        return [f"{name}.{self.prefix}{index}" for index in range(self.max)]

    def required(self, name: str, member: str) -> bool:
        """Whether `member` (a dotted name) is one of the first `min`, which must be given."""
        return member in self.members(name)[: self.min]

    def spec(self, lists: ResourceLists) -> list[Any]:
        template = {
            "input": {"required": {self.member_name: self.member.spec(lists)}},
            "prefix": self.prefix,
            "min": self.min,
            "max": self.max,
        }
        options: dict[str, Any] = {"template": template, **self.options}
        if self.tooltip:
            options["tooltip"] = self.tooltip
        return [self.type_name, options]


def expanded(declared: Mapping[str, Input], given: Mapping[str, Any]) -> dict[str, Input]:
    """The inputs a node has with these values: its declared ones and, after each DynamicCombo, the inputs
    of the option chosen (by dotted name, nested options too), in the order the frontend shows them; after
    each Autogrow, its required members and those given."""
    found: dict[str, Input] = {}
    for name, spec in declared.items():
        found[name] = spec
        if isinstance(spec, Autogrow):
            for index, member in enumerate(spec.members(name)):
                if index < spec.min or member in given:
                    found[member] = spec.member
        elif isinstance(spec, DynamicCombo):
            chosen = spec.option(_plain(given.get(name, spec.fallback())))
            if chosen is not None:
                inner = {key[len(name) + 1 :]: value for key, value in given.items() if key.startswith(name + ".")}
                for sub, sub_spec in expanded(chosen.inputs, inner).items():
                    found[f"{name}.{sub}"] = sub_spec
    return found


def nested(declared: Mapping[str, Input], inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Flat dotted inputs as a V3 node receives them: each DynamicCombo a dict of its choice (under its own
    name) and the chosen option's inputs."""
    result: dict[str, Any] = {}
    for name, value in inputs.items():
        if "." not in name:
            result.setdefault(name, value)
    for name, spec in declared.items():
        if isinstance(spec, Autogrow):
            given = {member: inputs[member] for member in spec.members(name) if member in inputs}
            result[name] = {member.removeprefix(name + "."): value for member, value in given.items()}
        if isinstance(spec, DynamicCombo) and name in inputs:
            chosen = spec.option(inputs[name])
            inner = {key[len(name) + 1 :]: value for key, value in inputs.items() if key.startswith(name + ".")}
            group = nested(chosen.inputs if chosen is not None else {}, inner)
            result[name] = {name: inputs[name], **group}
    return result


def _plain(value: Any) -> Any:
    return value["__value__"] if isinstance(value, dict) and "__value__" in value else value


def link(link_type: str, tooltip: str | None = None) -> Link:
    if link_type not in LINK_TYPES:
        raise ValueError(f"unknown link type {link_type}")
    return Link(tooltip=tooltip, link_type=link_type)


@dataclass(frozen=True)
class Output:
    type: str
    name: str | None = None
    tooltip: str | None = None


@dataclass
class NodeResult:
    """What a node returns: one value per declared output, and what it shows in the UI (history)."""

    outputs: tuple[Any, ...] = ()
    ui: dict[str, list[Any]] | None = None


class Node:
    """Base of every node. Subclasses declare; `run` receives the validated inputs as keyword arguments."""

    display_name: ClassVar[str | None] = None
    description: ClassVar[str] = ""
    category: ClassVar[str] = "sd"
    required: ClassVar[dict[str, Input]] = {}
    optional: ClassVar[dict[str, Input]] = {}
    hidden: ClassVar[dict[str, str]] = {}  # name → PROMPT, EXTRA_PNGINFO, UNIQUE_ID
    outputs: ClassVar[tuple[Output, ...]] = ()
    output_node: ClassVar[bool] = False
    experimental: ClassVar[bool] = False  # ComfyUI's EXPERIMENTAL flag, shown by the frontend
    # Its result depends on whose files it reads or writes: its cache entry is the caller's own (output
    # nodes always are).
    owned: ClassVar[bool] = False
    # Inputs whose list/range check `check` replaces (ComfyUI's VALIDATE_INPUTS arguments).
    custom_checks: ClassVar[tuple[str, ...]] = ()
    # A sampler's LATENT input: each run makes as many images as that latent holds (what quotas count).
    denoises: ClassVar[str | None] = None
    dynamic: ClassVar[bool] = False  # has a DynamicCombo or Autogrow input (set by __init_subclass__)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.dynamic = any(isinstance(spec, DynamicCombo | Autogrow) for spec in cls.all_inputs().values())

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        raise NotImplementedError

    @classmethod
    def check(cls, lists: ResourceLists, limits: Limits, **inputs: Any) -> str | None:
        """Validation of the inputs named in `custom_checks`; an error message, or None when fine."""
        return None

    @classmethod
    def demands(cls, **inputs: Any) -> list[tuple[str, str, int]]:
        """What running with these (converted) inputs asks of the machine, as (`Limits` field, input name,
        amount): by default the inputs declared with a `limit`; nodes that make images add their pixels."""
        return [(limit, name, inputs[name]) for name, limit in limited_inputs(cls) if isinstance(inputs.get(name), int)]

    @classmethod
    def batch(cls, constants: dict[str, Any], linked: dict[str, int]) -> int:
        """How many images (or latents, masks) the node's outputs will hold, told before anything runs:
        `constants` are its inputs that are values, `linked` the batch of each input that comes by a link.
        By default its declared batch input (a `limit="batch"` one), else the largest batch it is given."""
        declared = next((amount for limit, _, amount in cls.demands(**constants) if limit == "batch"), None)
        return declared if declared is not None else max(linked.values(), default=1)

    @classmethod
    def fingerprint(cls, lists: ResourceLists, **inputs: Any) -> Any:
        """A value that changes whenever the result would though the inputs did not (IS_CHANGED)."""
        return None

    @classmethod
    def all_inputs(cls) -> dict[str, Input]:
        return {**cls.required, **cls.optional}

    @classmethod
    def inputs_for(cls, given: Mapping[str, Any]) -> dict[str, Input]:
        """The inputs this node has with these values (`expanded`: a DynamicCombo's chosen option adds
        inputs of its own)."""
        declared = cls.all_inputs()
        if not cls.dynamic:
            return declared
        return expanded(declared, given)

    @classmethod
    def arguments(cls, inputs: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments `run` receives for these (flat, validated) inputs."""
        return nested(cls.all_inputs(), inputs) if cls.dynamic else inputs


class SizedNode(Node):
    """A node that makes pictures of its `width` × `height` inputs: their pixels count against the limit,
    when validated (where the inputs are constants) and again when it runs (where they came by links)."""

    # A latent the models draw at this size: its sides are also bounded as in every other route
    # (zimage_serve/limits.py MIN_SIDE..MAX_SIDE). object_info keeps ComfyUI's wider declared range, as KSampler's
    # steps keep ComfyUI's 10000 beside --max-steps. Images and masks (1×1 is a fine mask) are not drawn.
    drawn: ClassVar[bool] = False

    @classmethod
    def demands(cls, **inputs: Any) -> list[tuple[str, str, int]]:
        found = super().demands(**inputs)
        width, height = inputs.get("width"), inputs.get("height")
        if isinstance(width, int) and isinstance(height, int):
            found.append(("pixels", "width", width * height))
        return found

    @classmethod
    def side_refusals(cls, **inputs: Any) -> list[tuple[str, int, str]]:
        """(input name, value, why) for each side of a drawn latent outside the shared bounds."""
        from zimage_serve.limits import side_refusal

        if not cls.drawn:
            return []
        found = []
        for name in ("width", "height"):
            value = inputs.get(name)
            if isinstance(value, int):
                why = side_refusal(value, step=False)
                if why is not None:
                    found.append((name, value, why))
        return found

    def enforce_demands(self, limits: Limits, inputs: Mapping[str, Any]) -> None:
        from zimage_serve.limits import MAX_SIDE, MIN_SIDE, LimitExceeded, enforce

        for limit, name, amount in self.demands(**inputs):
            enforce(limits, limit, amount, name)
        for name, value, why in self.side_refusals(**inputs):
            raise LimitExceeded("side", value, MAX_SIDE if value > MAX_SIDE else MIN_SIDE, name, why)


_LIMITED: dict[type[Node], tuple[tuple[str, str], ...]] = {}
_PROMPTS: dict[type[Node], tuple[str, ...]] = {}


def limited_inputs(node: type[Node]) -> tuple[tuple[str, str], ...]:
    """(input name, `Limits` field) of a node class's inputs declared with a limit; read once per class."""
    found = _LIMITED.get(node)
    if found is None:
        found = _LIMITED[node] = tuple(
            (name, declared.limit)
            for name, declared in node.all_inputs().items()
            if isinstance(declared, Int) and declared.limit is not None
        )
    return found


def prompt_inputs(node: type[Node]) -> tuple[str, ...]:
    """The text inputs of a node class that an encoder reads (their bytes and tokens are limited)."""
    found = _PROMPTS.get(node)
    if found is None:
        found = _PROMPTS[node] = tuple(
            name for name, declared in node.all_inputs().items() if isinstance(declared, String) and declared.prompt
        )
    return found


def node_info(name: str, node: type[Node], lists: ResourceLists) -> dict[str, Any]:
    """ComfyUI's NodeInfo for one class (GET /object_info/{class})."""
    inputs: dict[str, Any] = {"required": {k: v.spec(lists) for k, v in node.required.items()}}
    order: dict[str, list[str]] = {"required": list(node.required)}
    if node.optional:
        inputs["optional"] = {k: v.spec(lists) for k, v in node.optional.items()}
        order["optional"] = list(node.optional)
    if node.hidden:
        inputs["hidden"] = dict(node.hidden)
        order["hidden"] = list(node.hidden)
    info: dict[str, Any] = {
        "input": inputs,
        "input_order": order,
        "output": [o.type for o in node.outputs],
        "output_is_list": [False for _ in node.outputs],
        "output_name": [o.name or o.type for o in node.outputs],
        "name": name,
        "display_name": node.display_name or name,
        "description": node.description,
        "python_module": "nodes",
        "category": node.category,
        "output_node": node.output_node,
    }
    if node.experimental:
        info["experimental"] = True
    if any(o.tooltip for o in node.outputs):
        info["output_tooltips"] = [o.tooltip for o in node.outputs]
    return info


def object_info(nodes: Mapping[str, type[Node]], lists: ResourceLists) -> dict[str, Any]:
    """GET /object_info: every node's info, with file lists read from disk now."""
    return {name: node_info(name, node, lists) for name, node in nodes.items()}
