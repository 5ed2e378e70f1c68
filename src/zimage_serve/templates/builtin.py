"""The templates shipped in the package: one per model, made from the shipped API workflows.

Each gains an optional LoRA: a LoraLoaderModelOnly between the diffusion model and its sampling shift,
bypassed while `lora_name` is unset, so the plain workflow runs unchanged.
"""

from __future__ import annotations

import copy
from functools import cache

from zimage_serve import workflows
from zimage_serve.templates.document import Bypass, Parameter, Template
from zimage_serve.templates.infer import infer_parameters
from zimage_serve.workflows.templates import TEMPLATES

LORA_NODE = "40"
NATIVE_SIZES = {"zimage-nano": 128}  # trained at one size only; the 6B models draw 512²–2048²


@cache
def _builtins() -> dict[str, Template]:
    made: dict[str, Template] = {}
    for shipped in TEMPLATES:
        workflow = workflows.load(shipped.workflow)
        shift = next(k for k, v in workflow.items() if v["class_type"] == "ModelSamplingAuraFlow")
        workflow[LORA_NODE] = {  # after whatever feeds the shift (the model, or a LoRA the recipe brings)
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"lora_name": "", "strength_model": 1.0, "model": workflow[shift]["inputs"]["model"]},
            "_meta": {"title": "LoRA (optional)"},
        }
        workflow[shift]["inputs"]["model"] = [LORA_NODE, 0]
        parameters = infer_parameters(workflow)
        lora = parameters["lora_name"]
        parameters["lora_name"] = Parameter(
            lora.name, lora.type, lora.targets, None, lora.description, bypass=Bypass(LORA_NODE, {0: "model"})
        )
        made[shipped.name] = Template(
            name=shipped.name,
            version=1,
            workflow=workflow,
            parameters=parameters,
            title=shipped.title,
            description=shipped.description,
            native_size=NATIVE_SIZES.get(shipped.name),
            builtin=True,
        )
    return made


def builtin(name: str) -> Template | None:
    found = _builtins().get(name)
    return copy.deepcopy(found) if found is not None else None


def builtin_names() -> tuple[str, ...]:
    return tuple(_builtins())
