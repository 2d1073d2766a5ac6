"""Test helpers: a tiny LLaMA checkpoint folder with a character-level tokenizer (no downloads)."""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tests.helpers.tiny_models import tiny_llama

CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"
SPECIAL = ["<unk>", "<s>", "</s>"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: ids 0-2 special (<unk>, <s>, </s>), then one id per character."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL + list(CHARS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def save_tiny_checkpoint(folder: Path, num_layers: int = 6, num_kv_heads: int = 2) -> Path:
    """Save a tiny random LLaMA whose vocabulary matches `char_tokenizer`; returns the folder."""
    tokenizer = char_tokenizer()
    model = tiny_llama(num_kv_heads, num_layers, vocab_size=len(tokenizer), pad_token_id=2, bos_token_id=1,
                       eos_token_id=2)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sample_text(chars: int = 20000) -> str:
    """Deterministic English-like text with repeated structure (learnable by a tiny model)."""
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly box jugs of liquor".split()
    out, i = [], 0
    while sum(len(w) + 1 for w in out) < chars:
        out.append(words[(i * 7 + i // 5) % len(words)])
        i += 1
    return " ".join(out)
