"""A small Qwen-style tokenizer for CPU runs, built locally (no model hub), and the special-token ids.

Byte-level BPE (any text encodes; digits split one per token as in Qwen2) trained on a fixed corpus:
the synthetic task's text, the prompt templates and the chat template words. Ordinary tokens take
ids 0..1015; the Qwen special tokens sit at exactly the `tiny` flavor's ids (1016..1022), so the
model config and the tokenizer agree. Training is deterministic: same files on every build.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from megatron_papo.data.prompts import DEFAULT_SYSTEM_PROMPT, PROMPT_TEMPLATES, QWEN_VL_CHAT_TEMPLATE

# Qwen2.5-VL's chat and vision special tokens; the tiny tokenizer gives them ids in this order, from
# TINY_SPECIAL_START (the tiny flavor's bos/endoftext id).
CHAT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>", "<|im_start|>")
TINY_SPECIAL_START = 1016
TINY_VOCAB_LIMIT = 1024  # the tiny flavor's embedding rows


@dataclass(frozen=True)
class SpecialTokenIds:
    """The ids a model config needs (names as in Qwen2_5_VLConfig)."""
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    image_token_id: int
    video_token_id: int
    vocab_size: int  # len(tokenizer): the smallest embedding that covers every id

    def as_config_overrides(self) -> dict[str, int]:
        """Keyword overrides for `get_flavor(...)` (vocab_size excluded: the flavor's may be padded)."""
        return {k: getattr(self, k) for k in ("bos_token_id", "eos_token_id", "vision_start_token_id",
                                               "vision_end_token_id", "image_token_id", "video_token_id")}


def special_token_ids(tokenizer) -> SpecialTokenIds:
    """Read the Qwen special-token ids from any Qwen-style tokenizer (the tiny one or a real one)."""
    def tid(tok: str) -> int:
        i = tokenizer.convert_tokens_to_ids(tok)
        if i is None or i == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {tok!r} token; a Qwen2/Qwen2.5-VL tokenizer is expected")
        return i

    eos = tid("<|im_end|>")
    return SpecialTokenIds(
        bos_token_id=tid("<|endoftext|>"), eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tid("<|endoftext|>"),
        vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"),
        image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"), vocab_size=len(tokenizer))


def _corpus() -> list[str]:
    from megatron_papo.data.synthetic import corpus_lines  # same package; lazy keeps import light

    words = [DEFAULT_SYSTEM_PROMPT, "system", "user", "assistant", "<image>", "<think>", "</think>",
             "\\boxed{", "}", "\\frac{", "A. B. C. D. (A) (B) (C) (D)", "0 1 2 3 4 5 6 7 8 9 . , + - * / = ^ ( )"]
    return [t.replace("{content}", "") for t in PROMPT_TEMPLATES.values()] + words + corpus_lines()


def build_tiny_tokenizer():
    """The tiny-flavor tokenizer as a transformers PreTrainedTokenizerFast (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    n_ordinary = TINY_SPECIAL_START
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n_ordinary, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # repeat the corpus so pair counts are large and ties are rare; training is single-pass, deterministic
    tok.train_from_iterator(_corpus() * 4, trainer=trainer)
    # A small corpus may stop merging early: pad with reserved tokens so specials land at their ids.
    reserved = [f"<|reserved_{i}|>" for i in range(n_ordinary - tok.get_vocab_size())]
    tok.add_special_tokens(reserved + list(CHAT_SPECIAL_TOKENS))
    for i, t in enumerate(CHAT_SPECIAL_TOKENS):
        assert tok.token_to_id(t) == TINY_SPECIAL_START + i, (t, tok.token_to_id(t))
    assert tok.get_vocab_size() <= TINY_VOCAB_LIMIT
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, additional_special_tokens=list(CHAT_SPECIAL_TOKENS),
        chat_template=QWEN_VL_CHAT_TEMPLATE, model_max_length=4096, padding_side="right")


def save_tiny_tokenizer(folder: str | os.PathLike) -> str:
    """Build the tiny tokenizer into `folder` (created); load it back with `load_tokenizer(folder)`."""
    os.makedirs(folder, exist_ok=True)
    build_tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def load_tokenizer(folder: str | os.PathLike):
    """A tokenizer from a local folder (the tiny one or a real Qwen2.5-VL model folder), offline."""
    from transformers import AutoTokenizer

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if not tok.chat_template:  # HF VL folders may keep the template with the processor instead
        processor_template = os.path.join(folder, "chat_template.json")
        if os.path.isfile(processor_template):
            with open(processor_template, encoding="utf-8") as f:
                tok.chat_template = json.load(f)["chat_template"]
        else:
            tok.chat_template = QWEN_VL_CHAT_TEMPLATE
    return tok
