"""Tiny random LLaMA models built in the tests (no downloads)."""

from __future__ import annotations

import torch
import transformers

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


def move_lisa_weights(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Add seeded noise of `scale` to every LiSA weight (in place), so that an adapter differs from its init
    and loading the wrong one changes the logits. Returns the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lisa_" in name:
                param.add_((torch.randn(param.shape, generator=generator) * scale).to(param.dtype))
    return model.eval()
