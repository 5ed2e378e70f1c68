"""Turning a prompt into token ids exactly as Z-Image is prompted (and as zimage-nano is trained)."""

from __future__ import annotations

from typing import Any

# Qwen3's chat template for one user turn, as ComfyUI hard-codes it; used when a tokenizer has none.
PROMPT_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


def prompt_token_ids(tokenizer: Any, text: str) -> list[int]:
    """The templated prompt's ids, untruncated (diffusers: chat template with enable_thinking=True)."""
    if getattr(tokenizer, "chat_template", None):
        templated = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
    else:
        templated = PROMPT_TEMPLATE.format(text)
    ids: list[int] = tokenizer(templated, add_special_tokens=False)["input_ids"]
    return ids
