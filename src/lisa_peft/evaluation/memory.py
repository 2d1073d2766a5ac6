"""KV-cache and adapter size accounting: analytic (no model weights needed) and of a real cache."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..tuners.lisa.model import default_rank


@dataclass(frozen=True)
class KVCacheBytes:
    """KV-cache size of one model for a batch/sequence length, base vs LiSA."""

    base: int
    lisa: int

    @property
    def ratio(self) -> float:
        """lisa / base."""
        return self.lisa / self.base


def _attention_shape(model_config: Any) -> tuple[int, int, int, int]:
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    return model_config.num_hidden_layers, heads, kv_heads, head_dim


Ranks = int | Mapping[Any, int] | None  # one rank, or {layer (int or str): rank}; None = the default


def _layer_ranks(ranks: Ranks, lisa_layers: list[int], head_dim: int) -> dict[int, int]:
    """{LiSA layer: rank} from one rank, a per-layer mapping (layers it lacks get the default) or None."""
    default = default_rank(head_dim)
    if isinstance(ranks, Mapping):
        per_layer = {int(k): v for k, v in ranks.items()}
        return {i: per_layer.get(i, default) for i in set(lisa_layers)}
    return {i: default if ranks is None else ranks for i in set(lisa_layers)}


def kv_cache_bytes(
    model_config: Any,
    lisa_layers: list[int],
    r: Ranks = None,
    batch_size: int = 1,
    seq_len: int = 4096,
    dtype: torch.dtype = torch.float16,
    keys_only: bool = False,
) -> KVCacheBytes:
    """Bytes of the KV cache for `batch_size` sequences of `seq_len` tokens, base vs LiSA.

    A full layer caches K and V, [B, G, N, D] each; a LiSA layer caches Kr [B, G, N, r] and
    V [B, G, N, D]. `keys_only=True` counts the key cache alone (where LiSA's saving lies).
    `r`: one rank for every LiSA layer, or {layer: rank} (a `layer_ranks`); None = head_dim/6, even.
    `model_config` is a transformers config (or a `PeftModel`/model with `.config`).
    """
    model_config = getattr(model_config, "config", model_config)
    layers, _, kv_heads, head_dim = _attention_shape(model_config)
    ranks = _layer_ranks(r, lisa_layers, head_dim)
    elem = torch.empty((), dtype=dtype).element_size()
    per_token = batch_size * seq_len * kv_heads * elem
    value = 0 if keys_only else head_dim
    base = layers * per_token * (head_dim + value)
    lisa = (layers - len(ranks)) * per_token * (head_dim + value) + sum(per_token * (rank + value)
                                                                         for rank in ranks.values())
    return KVCacheBytes(base=base, lisa=lisa)


def stored_cache_bytes(cache: Any) -> int:
    """Bytes a transformers KV cache really holds: the memory behind its layers' keys and values.

    Counts each tensor's whole storage once, not just the viewed positions, so the spare room of a
    `growing_cache.GrowingLayer` (keys/values are views of larger buffers) is counted too. Quantized
    layers (`cache_implementation="quantized"`) count their quantized states as well: the packed data,
    scales and shifts inside optimum-quanto's tensors, HQQ's or fp8's (tensor, metadata) pairs.
    """
    seen: set[int] = set()
    total = 0

    def add(item: Any) -> None:
        nonlocal total
        if isinstance(item, (tuple, list)):
            for part in item:
                add(part)
        elif isinstance(item, dict):
            for part in item.values():
                add(part)
        elif isinstance(item, torch.Tensor) and hasattr(item, "__tensor_flatten__"):  # a quantized tensor subclass
            for name in item.__tensor_flatten__()[0]:
                add(getattr(item, name))
        elif isinstance(item, torch.Tensor) and item.numel():
            storage = item.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()

    for layer in cache.layers:
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            add(getattr(layer, name, None))
    return total


def _base_cache_dtype(model: Any) -> torch.dtype:
    """The dtype of the base model's attention values, which is what every cache entry is stored in."""
    for module in model.get_base_model().modules():
        v_proj = getattr(module, "v_proj", None)
        if isinstance(v_proj, torch.nn.Linear):
            return v_proj.weight.dtype
    return next(model.parameters()).dtype


def model_kv_cache_bytes(
    model: Any,
    batch_size: int = 1,
    seq_len: int = 4096,
    dtype: torch.dtype | None = None,
    adapter_name: str | None = None,
) -> KVCacheBytes:
    """`kv_cache_bytes` for a LiSA `PeftModel` (its active adapter unless `adapter_name` is given).

    `dtype` defaults to the base model's attention dtype: LiSA layers store their low-rank keys and
    the values in it whatever `lisa_dtype` is (tested against a real cache, `stored_cache_bytes`).
    """
    adapter_name = adapter_name or model.active_adapter
    config = model.peft_config[adapter_name]
    base_config = model.get_base_model().config
    dtype = dtype or _base_cache_dtype(model)
    return kv_cache_bytes(base_config, config.lisa_layers, config.ranks(), batch_size, seq_len, dtype)


def lisa_parameter_count(model_config: Any, lisa_layers: list[int], r: Ranks = None, ffn_hidden: int | None = None,
                         bias: bool = False) -> int:
    """Number of LiSA weights: per LiSA layer Wq_r [H*r, d], Wk_r [G*r, d] and the head FFN (H->F->H).

    `r`: one rank, or {layer: rank}; None = head_dim/6, even.
    """
    model_config = getattr(model_config, "config", model_config)
    _, heads, kv_heads, head_dim = _attention_shape(model_config)
    ranks = _layer_ranks(r, lisa_layers, head_dim)
    hidden = 2 * heads if ffn_hidden is None else ffn_hidden
    d = model_config.hidden_size
    ffn = heads * hidden + hidden + hidden * heads + heads
    return sum((heads + kv_heads) * rank * (d + (1 if bias else 0)) + ffn for rank in ranks.values())


def base_parameter_count(model: Any) -> int:
    """Parameters of the base model inside a LiSA `PeftModel` (its LiSA weights not counted)."""
    return sum(p.numel() for name, p in model.get_base_model().named_parameters() if "lisa_" not in name)


def llama_parameter_count(cfg: Any) -> int:
    """Parameters of a LLaMA-architecture model from its config (embeddings, layers, norm, head)."""
    d, vocab, inter = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or d // heads
    attn_bias = bool(getattr(cfg, "attention_bias", False))
    mlp_bias = bool(getattr(cfg, "mlp_bias", False))
    attn = d * heads * head_dim + 2 * d * kv_heads * head_dim + heads * head_dim * d
    if attn_bias:
        attn += heads * head_dim + 2 * kv_heads * head_dim + d
    mlp = 3 * d * inter + ((2 * inter + d) if mlp_bias else 0)
    per_layer = attn + mlp + 2 * d
    head = 0 if getattr(cfg, "tie_word_embeddings", False) else vocab * d
    return vocab * d + cfg.num_hidden_layers * per_layer + d + head


__all__ = [
    "KVCacheBytes", "base_parameter_count", "kv_cache_bytes", "lisa_parameter_count", "llama_parameter_count",
    "model_kv_cache_bytes", "stored_cache_bytes",
]
