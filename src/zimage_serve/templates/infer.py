"""The usual parameters, found in a workflow that declares none: what a ComfyUI user would change.

From each KSampler (or KSamplerAdvanced) outwards: its seed, steps, cfg, sampler and scheduler; the text
of the CLIPTextEncode on its positive and negative inputs (a ConditioningZeroOut negative has no text);
the size and batch of the empty latent it starts from; the first LoRA loader (bypassed when unset to
null); the first LoadImage; and the first SaveImage's prefix. Each default is the value the workflow has.
"""

from __future__ import annotations

from typing import Any

from zimage_serve.engine.names import SAMPLERS, SCHEDULERS
from zimage_serve.limits import MAX_SIDE, MIN_SIDE, SIDE_STEP
from zimage_serve.templates.document import Bypass, Parameter, Target
from zimage_serve.workflow.spec import MAX_SEED

SAMPLER_NODES = ("KSampler", "KSamplerAdvanced")
LATENT_NODES = ("EmptySD3LatentImage", "EmptyLatentImage")
SEED_INPUTS = ("seed", "noise_seed")


def infer_parameters(workflow: dict[str, Any]) -> dict[str, Parameter]:
    found: dict[str, list[Target]] = {}
    samplers = _of_class(workflow, SAMPLER_NODES)

    def add(name: str, node: str, name_in_node: str) -> None:
        if name_in_node in workflow[node].get("inputs", {}):
            targets = found.setdefault(name, [])
            if Target(node, name_in_node) not in targets:
                targets.append(Target(node, name_in_node))

    for node in samplers:
        inputs = workflow[node].get("inputs", {})
        for seed in SEED_INPUTS:
            add("seed", node, seed)
        add("steps", node, "steps")
        add("cfg", node, "cfg")
        add("sampler", node, "sampler_name")
        add("scheduler", node, "scheduler")
        for slot, name in (("positive", "prompt"), ("negative", "negative")):
            source = _source(workflow, inputs.get(slot))
            if source is not None and workflow[source]["class_type"] == "CLIPTextEncode":
                add(name, source, "text")
        latent = _source(workflow, inputs.get("latent_image"))
        if latent is not None and workflow[latent]["class_type"] in LATENT_NODES:
            add("width", latent, "width")
            add("height", latent, "height")
            add("batch_size", latent, "batch_size")
    for node in _of_class(workflow, ("LoraLoaderModelOnly", "LoraLoader"))[:1]:
        add("lora_name", node, "lora_name")
        add("lora_strength", node, "strength_model")
    for node in _of_class(workflow, ("LoadImage",))[:1]:
        add("image", node, "image")
    for node in _of_class(workflow, ("SaveImage",))[:1]:
        add("prefix", node, "filename_prefix")

    parameters: dict[str, Parameter] = {}
    for name, targets in found.items():
        first = targets[0]
        default = workflow[first.node]["inputs"][first.input]
        if isinstance(default, list):  # a link: the value comes from another node, not a widget
            continue
        parameters[name] = _parameter(name, tuple(targets), default, workflow)
    order = list(DESCRIPTIONS)
    return dict(sorted(parameters.items(), key=lambda item: order.index(item[0])))


def _parameter(name: str, targets: tuple[Target, ...], default: Any, workflow: dict[str, Any]) -> Parameter:
    described = DESCRIPTIONS.get(name, "")
    if name == "seed":
        return Parameter(name, "int", targets, default, described, minimum=0, maximum=MAX_SEED)
    if name in ("steps", "batch_size"):
        return Parameter(name, "int", targets, default, described, minimum=1, maximum=10_000)
    if name in ("width", "height"):  # the sides every route allows (the server's pixel limit is its own)
        return Parameter(name, "int", targets, default, described, minimum=MIN_SIDE, maximum=MAX_SIDE)
    if name in ("cfg", "lora_strength"):
        return Parameter(name, "float", targets, default, described, minimum=-100.0, maximum=100.0)
    if name == "sampler":
        return Parameter(name, "choice", targets, default, described, choices=SAMPLERS)
    if name == "scheduler":
        return Parameter(name, "choice", targets, default, described, choices=SCHEDULERS)
    if name == "image":
        return Parameter(name, "image", targets, default, described)
    if name == "lora_name":
        node = targets[0].node
        through = {0: "model", 1: "clip"} if workflow[node]["class_type"] == "LoraLoader" else {0: "model"}
        return Parameter(name, "string", targets, default, described, bypass=Bypass(node, through))
    return Parameter(name, "string", targets, default, described, allow_empty=name != "prompt")


DESCRIPTIONS = {
    "prompt": "What to draw",
    "negative": "What to keep out (used when cfg > 1)",
    "seed": "The noise seed: the same seed and values give the same image",
    "width": f"Image width in pixels (a multiple of {SIDE_STEP})",
    "height": f"Image height in pixels (a multiple of {SIDE_STEP})",
    "steps": "Sampler steps",
    "cfg": "Classifier-free guidance (ComfyUI's scale; 1 is off)",
    "sampler": "The sampler",
    "scheduler": "The noise schedule",
    "batch_size": "Images per job",
    "lora_name": "A LoRA file under loras/; null leaves the LoRA out",
    "lora_strength": "The LoRA's strength on the diffusion model",
    "image": "An input image (a name in the input folder, as /upload/image answers)",
    "prefix": "The output files' name prefix (may hold a subfolder)",
}


def _of_class(workflow: dict[str, Any], classes: tuple[str, ...]) -> list[str]:
    return sorted((k for k, v in workflow.items() if v.get("class_type") in classes), key=lambda k: (len(k), k))


def _source(workflow: dict[str, Any], value: Any) -> str | None:
    if isinstance(value, list) and len(value) == 2 and str(value[0]) in workflow:
        return str(value[0])
    return None
