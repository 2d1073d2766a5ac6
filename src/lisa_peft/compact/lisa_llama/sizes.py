"""Sizes of a compact LiSA model, measured on its tensors (works on the meta device)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .configuration_lisa_llama import LISA_MODULE_NAMES, LisaLlamaConfig


@dataclass(frozen=True)
class CompactSizes:
    """Parameter bytes of one model in its three forms, and the Q/K compression of its LiSA layers."""

    base: int
    adapter_form: int
    compact: int
    lisa_weights: int
    dropped_qk: int
    head_dim: int
    r: float  # mean low-rank Q/K width over the LiSA layers (their one `r` unless ranks differ per layer)

    @property
    def compact_ratio(self) -> float:
        """compact / base."""
        return self.compact / self.base

    @property
    def qk_compression(self) -> float:
        """head_dim / r: the Q/K compression of the LiSA layers (the paper's "6x compression of Q and K");
        with ranks per layer, head_dim over their mean (the ratio of the Q/K widths summed over those layers)."""
        return self.head_dim / self.r


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the distinct parameters of `model` (tied weights counted once; works on the meta device)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def dropped_qk_bytes(config: LisaLlamaConfig, dtype: torch.dtype) -> int:
    """Bytes of the base W_q / W_k (and biases) of the LiSA layers: (H + G) * D * (d [+ 1]) per layer."""
    heads, kv, d = config.num_attention_heads, config.num_key_value_heads, config.hidden_size
    per_layer = (heads + kv) * config.lisa_head_dim * (d + (1 if config.attention_bias else 0))
    return len(config.lisa_layers) * per_layer * torch.empty((), dtype=dtype).element_size()


def compact_sizes(compact: nn.Module) -> CompactSizes:
    """Sizes of a compact model, measured on its tensors; base = compact - LiSA weights + the dropped Q/K."""
    lisa_bytes = sum(
        p.numel() * p.element_size()
        for m in compact.modules() if hasattr(m, "lisa_ffn_up")
        for name in LISA_MODULE_NAMES for p in getattr(m, name).parameters()
    )
    total = parameter_bytes(compact)
    attn = next(m for m in compact.modules() if hasattr(m, "lisa_ffn_up"))
    dropped = dropped_qk_bytes(compact.config, attn.v_proj.weight.dtype)
    base = total - lisa_bytes + dropped
    return CompactSizes(base=base, adapter_form=base + lisa_bytes, compact=total, lisa_weights=lisa_bytes,
                        dropped_qk=dropped, head_dim=compact.config.lisa_head_dim, r=mean_rank(compact.config))


def mean_rank(config: LisaLlamaConfig) -> float:
    """Mean low-rank Q/K width over the LiSA layers (an int when every layer has the same)."""
    ranks = [config.lisa_rank_of(i) for i in config.lisa_layers]
    mean = sum(ranks) / len(ranks)
    return int(mean) if len(set(ranks)) == 1 else mean
