"""Text conditioning: prompts become CONDITIONING (a list of prompt embeddings)."""

from __future__ import annotations

from typing import Any

from zimage_serve.errors import GenerationCancelled
from zimage_serve.workflow.context import Interrupted, NodeContext
from zimage_serve.workflow.limits import enforce
from zimage_serve.workflow.spec import Node, NodeResult, Output, String, link


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
        import torch

        from zimage_serve.engine.text import PromptEmbedding

        zeroed = [
            PromptEmbedding(torch.zeros_like(e.embeds), e.token_count, e.truncated_tokens)
            for e in inputs["conditioning"]
        ]
        return NodeResult((zeroed,))
