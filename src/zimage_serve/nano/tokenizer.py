"""A byte-level BPE tokenizer in Qwen2's format, trained on a caption corpus.

Byte-level means any UTF-8 text encodes (no unknown token); the special tokens and the chat template
are Qwen3's, so the engine prompts it exactly as it prompts Z-Image-Turbo's own tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Qwen2Tokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen3's template reduced to what a single user turn needs; it renders the same text for that turn.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


# CJK ideographs and full-width punctuation. Qwen's pre-tokenizer keeps a run of them as one piece, so on a
# corpus this small BPE would merge whole phrases ("一个大白色的圆形") into one opaque token and Chinese
# would lose the colour/shape/size words that English keeps apart.
CJK_CHARACTER = Regex(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]")


def train_tokenizer(corpus: Iterable[str], vocab_size: int, cjk_split: bool = True) -> Qwen2Tokenizer:
    """Train merges that never cross a CJK character boundary.

    Qwen2Tokenizer replaces the pre-tokenizer with Qwen's own when it loads, but BPE only applies merges
    it has learned; training on one piece per CJK character means the merges stop inside a character,
    so Chinese text tokenizes to one token per character however it is pre-tokenized later.
    """
    backend = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if cjk_split:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(CJK_CHARACTER, behavior="isolated"), byte_level]
        )
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    tokenizer = Qwen2Tokenizer(
        tokenizer_object=backend,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=131072,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
