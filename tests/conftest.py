"""Shared fixtures: tiny random LLaMA models built in the tests (no downloads)."""

from __future__ import annotations

import os

# Before anything imports triton (transformers does, via torch._dynamo): Triton kernels run in
# the CPU interpreter in tests. Start pytest with TRITON_INTERPRET=0 on a GPU to run them natively.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from conftest_hub import hub_client, hub_server  # noqa: F401  (offline Hub test infrastructure)

import lisa_peft  # noqa: F401  (registers the LISA PEFT method)

VOCAB = 96


def tiny_llama_config(num_kv_heads: int = 2, num_layers: int = 6, **overrides) -> transformers.LlamaConfig:
    """4 query heads of dim 16; GQA when num_kv_heads < 4."""
    values = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    values.update(overrides)
    return transformers.LlamaConfig(**values)


def tiny_llama(num_kv_heads: int = 2, num_layers: int = 6, seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    """A deterministic tiny random LlamaForCausalLM in eval mode."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(tiny_llama_config(num_kv_heads, num_layers, **overrides))
    return model.eval()


@pytest.fixture(params=[4, 2], ids=["mha", "gqa"])
def kv_heads(request) -> int:
    return request.param


@pytest.fixture
def input_ids() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB, (2, 12), generator=generator)
