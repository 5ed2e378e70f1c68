"""Text conditioning: prompts become CONDITIONING (a list of prompt embeddings)."""

from __future__ import annotations

import logging
from typing import Any

from zimage_serve.errors import GenerationCancelled
from zimage_serve.limits import enforce
from zimage_serve.workflow.context import Interrupted, NodeContext
from zimage_serve.workflow.spec import Float, Node, NodeResult, Output, String, link

log = logging.getLogger(__name__)


class CLIPTextEncode(Node):
    display_name = "CLIP Text Encode (Prompt)"
    category = "conditioning"
    description = "Encodes a text prompt (English or Chinese) with the text encoder."
    required = {
        "text": String(multiline=True, dynamic_prompts=True, prompt=True, tooltip="The text to be encoded."),
        "clip": link("CLIP", "The CLIP model used for encoding the text."),
    }
    outputs = (Output("CONDITIONING", tooltip="A conditioning containing the embedded text."),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        text: str = inputs["text"]
        enforce(ctx.limits, "prompt_bytes", len(text.encode("utf-8")), "text")
        enforce(ctx.limits, "prompt_tokens", inputs["clip"].token_count(text), "text")
        try:
            from zimage_serve.engine.cancel import cancellable

            with cancellable(ctx.interrupted):
                return NodeResult(([inputs["clip"].encode(text)],))
        except GenerationCancelled as exc:
            raise Interrupted(str(exc)) from exc


class ConditioningZeroOut(Node):
    category = "advanced/conditioning"
    description = "The same conditioning with every feature set to zero (Z-Image's negative at cfg 1)."
    required = {"conditioning": link("CONDITIONING")}
    outputs = (Output("CONDITIONING"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        from dataclasses import replace

        import torch

        zeroed = [replace(e, embeds=torch.zeros_like(e.embeds)) for e in inputs["conditioning"]]
        return NodeResult((zeroed,))


class ConditioningCombine(Node):
    display_name = "Conditioning (Combine)"
    category = "conditioning"
    description = "Both conditionings' entries: the sampler averages their predictions."
    required = {"conditioning_1": link("CONDITIONING"), "conditioning_2": link("CONDITIONING")}
    outputs = (Output("CONDITIONING"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        return NodeResult(([*inputs["conditioning_1"], *inputs["conditioning_2"]],))


class ConditioningConcat(Node):
    display_name = "Conditioning (Concat)"
    category = "conditioning"
    description = "Each entry of conditioning_to with the first entry of conditioning_from's tokens appended."
    required = {"conditioning_to": link("CONDITIONING"), "conditioning_from": link("CONDITIONING")}
    outputs = (Output("CONDITIONING"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        from dataclasses import replace

        import torch

        source = inputs["conditioning_from"]
        if len(source) > 1:
            log.warning("ConditioningConcat: conditioning_from has %d entries; only the first is used", len(source))
        appended = source[0]
        joined = [
            replace(
                entry,
                embeds=torch.cat((entry.embeds, appended.embeds.to(entry.embeds.dtype)), dim=0),
                token_count=entry.token_count + appended.token_count,
            )
            for entry in inputs["conditioning_to"]
        ]
        return NodeResult((joined,))


class ConditioningSetTimestepRange(Node):
    category = "advanced/conditioning"
    description = "Use the conditioning only from `start` to `end` of the schedule (0 = its first step)."
    required = {
        "conditioning": link("CONDITIONING"),
        "start": Float(default=0.0, min=0.0, max=1.0, step=0.001),
        "end": Float(default=1.0, min=0.0, max=1.0, step=0.001),
    }
    outputs = (Output("CONDITIONING"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        from dataclasses import replace

        ranged = [
            replace(entry, start_percent=inputs["start"], end_percent=inputs["end"]) for entry in inputs["conditioning"]
        ]
        return NodeResult((ranged,))
