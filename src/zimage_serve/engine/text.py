"""Prompt encoding: the Qwen3 text encoder's second-to-last hidden state, as Z-Image is prompted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from zimage_serve.engine.prompt import prompt_token_ids


@dataclass(frozen=True)
class PromptEmbedding:
    """One CONDITIONING entry. `start_percent`/`end_percent` are ComfyUI's timestep range: the part of the
    schedule (0 = its start, 1 = its end) over which the sampler uses the entry."""

    embeds: torch.Tensor  # [tokens, features]: the text encoder's second-to-last hidden state
    token_count: int  # tokens of the templated prompt before truncation
    truncated_tokens: int  # tokens cut at the sequence limit (0 when it fit)
    start_percent: float = 0.0
    end_percent: float = 1.0


@torch.inference_mode()
def encode_text(
    text_encoder: Any, tokenizer: Any, text: str, device: torch.device, max_sequence_length: int | None = None
) -> PromptEmbedding:
    """The second-to-last hidden state of the templated prompt.

    Unpadded: the encoder is causal, so padding would not change these tokens' states. ComfyUI does not
    truncate Z-Image prompts (`max_sequence_length` None); diffusers stops at 512 tokens.
    """
    ids = prompt_token_ids(tokenizer, text)
    kept = ids if max_sequence_length is None else ids[:max_sequence_length]
    input_ids = torch.tensor([kept], dtype=torch.long, device=device)
    hidden = text_encoder(input_ids=input_ids, output_hidden_states=True).hidden_states[-2]
    return PromptEmbedding(hidden[0], len(ids), len(ids) - len(kept))
