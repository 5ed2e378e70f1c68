"""Counting a prompt's tokens before it is queued, with the tokenizer the run will use.

A text encoder reaches CLIPTextEncode through a link from a loader (CLIPLoader, CheckpointLoaderSimple),
perhaps through nodes that pass it on (LoraLoader). The loader's file names the tokenizer, found as the
loader finds it; tokenizers are loaded once per folder. Byte-level BPE never makes more tokens than the
text has bytes, so a short text needs no tokenizer at all.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from zimage_serve.engine.prompt import prompt_token_ids
from zimage_serve.errors import ZImageError
from zimage_serve.workflow.folders import Folders
from zimage_serve.workflow.validate import is_link, link_source

log = logging.getLogger(__name__)

# Loader class → (the input naming its file, the folder resource it names one from).
CLIP_LOADERS = {"CLIPLoader": ("clip_name", "text_encoders"), "CheckpointLoaderSimple": ("ckpt_name", "checkpoints")}
MAX_HOPS = 64
TEMPLATE_TOKENS = 16  # what the chat template adds, at most, around the text


def tokenizer_folder(folders: Folders, resource: str, name: str) -> Path:
    """Where the tokenizer of a text encoder file or folder is, as the loader nodes look for it."""
    from zimage_serve.engine.layouts import find_tokenizer  # diffusers: only when a tokenizer is looked for

    path = folders.resolve(resource, name)
    if path.is_dir():
        return find_tokenizer(None, default=path / "tokenizer")
    return find_tokenizer(None, text_encoder_file=path)


@functools.lru_cache(maxsize=8)
def _tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


class PromptTokens:
    """Counts the tokens of a text input of a node, given the graph it is in."""

    def __init__(self, folders: Folders) -> None:
        self.folders = folders

    def count(self, prompt: dict[str, Any], node_id: str, text: str, within: int) -> int | None:
        """The templated prompt's token count, or None when it is certainly within `within` tokens or no
        tokenizer can be found (the encoder then checks the count itself, when it runs)."""
        if len(text.encode("utf-8")) + TEMPLATE_TOKENS <= within:
            return None
        loader = self._loader(prompt, node_id)
        if loader is None:
            return None
        try:
            tokenizer = _tokenizer(tokenizer_folder(self.folders, *loader))
        except (ZImageError, OSError, ValueError) as exc:
            log.info("prompt tokens not counted before queueing (%s); the encoder counts them", exc)
            return None
        return len(prompt_token_ids(tokenizer, text))

    @staticmethod
    def _loader(prompt: dict[str, Any], node_id: str) -> tuple[str, str] | None:
        """(resource, file name) of the loader at the start of the node's `clip` link."""
        current = prompt.get(node_id)
        for _ in range(MAX_HOPS):
            if not isinstance(current, dict):
                return None
            inputs = current.get("inputs")
            if not isinstance(inputs, dict):
                return None
            if current.get("class_type") in CLIP_LOADERS:
                name_input, resource = CLIP_LOADERS[current["class_type"]]
                name = inputs.get(name_input)
                return (resource, name) if isinstance(name, str) else None
            clip = inputs.get("clip")
            source = link_source(clip) if isinstance(clip, list) and is_link(clip) else None
            if source is None:
                return None
            current = prompt.get(source[0])
        return None
