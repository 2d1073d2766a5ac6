"""What a LiSA adapter trades: layers replaced, Q/K compression, bytes saved and the fidelity it reached.

One description for the training summary, the model card and `lisa-peft analyze --adapter`, computed from the
adapter's config and the base model's config (no weights needed):

* fraction: LiSA layers / all layers;
* Q/K compression: head_dim / mean rank of the LiSA layers (their summed Q/K widths, base over LiSA);
* KV cache: bytes per token (float16) base vs LiSA, and the key cache alone;
* parameters: the compact model (`merge_and_unload`) drops the base W_q / W_k of the LiSA layers and adds
  the LiSA weights; saving relative to the base parameter count;
* fidelity: what the recipe recorded in `layer_scores["fidelity"]` (held-out perplexity ratio, KL, zero-shot).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..tuners.lisa.model import default_rank
from .memory import (
    _attention_shape,
    base_parameter_count,
    kv_cache_bytes,
    lisa_parameter_count,
    llama_parameter_count,
)


@dataclass(frozen=True)
class OperatingPoint:
    """The trade of one LiSA adapter (see module docstring); savings are fractions of the base model's."""

    num_layers: int
    ranks: dict[int, int]  # {LiSA layer: rank}
    head_dim: int
    kv_bytes_per_token_base: int
    kv_bytes_per_token_lisa: int
    key_cache_saving: float
    parameters_base: int
    parameters_compact: int
    fidelity: dict[str, Any] | None

    @property
    def lisa_layers(self) -> int:
        return len(self.ranks)

    @property
    def fraction(self) -> float:
        return self.lisa_layers / self.num_layers

    @property
    def mean_rank(self) -> float:
        return sum(self.ranks.values()) / len(self.ranks)

    @property
    def qk_compression(self) -> float:
        return self.head_dim / self.mean_rank

    @property
    def kv_cache_saving(self) -> float:
        return 1 - self.kv_bytes_per_token_lisa / self.kv_bytes_per_token_base

    @property
    def parameter_saving(self) -> float:
        return 1 - self.parameters_compact / self.parameters_base

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the fields plus the derived fractions (rounded)."""
        values = asdict(self)
        values["ranks"] = {str(k): v for k, v in self.ranks.items()}
        values.update(
            lisa_layers=self.lisa_layers, fraction=round(self.fraction, 4), mean_rank=round(self.mean_rank, 3),
            qk_compression=round(self.qk_compression, 3), kv_cache_saving=round(self.kv_cache_saving, 4),
            key_cache_saving=round(self.key_cache_saving, 4), parameter_saving=round(self.parameter_saving, 4),
        )
        return values

    def describe(self) -> str:
        """One line: layers, compression, bytes saved, fidelity."""
        parts = [
            f"{self.lisa_layers} of {self.num_layers} layers LiSA ({self.fraction:.0%})",
            f"Q/K compression {self.qk_compression:.2g}x (r = {rank_text(self.ranks)} of head_dim {self.head_dim})",
            f"KV cache -{self.kv_cache_saving:.1%} ({self.kv_bytes_per_token_lisa:,} vs "
            f"{self.kv_bytes_per_token_base:,} bytes/token in float16)",
            f"compact model parameters -{self.parameter_saving:.1%}",
        ]
        fidelity = self.fidelity or {}
        if "ppl_ratio" in fidelity:
            text = f" on {fidelity['text']}" if fidelity.get("text") else ""
            parts.append(f"held-out perplexity ratio {fidelity['ppl_ratio']:.4g}, KL {fidelity['kl']:.3g}{text}")
        shot = fidelity.get("zero_shot") or {}
        if "lisa_acc_norm" in shot:
            parts.append(f"{shot.get('task', 'zero-shot')} acc_norm {shot['lisa_acc_norm']:.3f} "
                         f"(base {shot['base_acc_norm']:.3f})")
        return " · ".join(parts)


def rank_text(ranks: Mapping[Any, int]) -> str:
    """The ranks {layer: r} in words: "16", or "8-24 per layer, mean 16" when they differ."""
    values = sorted(set(ranks.values()))
    if len(values) == 1:
        return str(values[0])
    return f"{values[0]}-{values[-1]} per layer, mean {sum(ranks.values()) / len(ranks):.3g}"


def operating_point(config: Any, base_config: Any, base_parameters: int | None = None) -> OperatingPoint:
    """The `OperatingPoint` of a resolved `LisaConfig` on a base model config (or a model with `.config`).

    base_parameters: the base model's parameter count; default: estimated from its config (LLaMA layout).
    """
    base_config = getattr(base_config, "config", base_config)
    num_layers, heads, kv_heads, head_dim = _attention_shape(base_config)
    layers = list(config.lisa_layers)
    ranks = config.ranks(default_rank(head_dim))
    kv = kv_cache_bytes(base_config, layers, ranks, seq_len=1, dtype=torch.float16)
    keys = kv_cache_bytes(base_config, layers, ranks, seq_len=1, dtype=torch.float16, keys_only=True)
    bias = bool(getattr(base_config, "attention_bias", False))
    added = lisa_parameter_count(base_config, layers, ranks, config.ffn_hidden, bias=bias)
    dropped = len(layers) * (heads + kv_heads) * head_dim * (base_config.hidden_size + (1 if bias else 0))
    base = base_parameters or llama_parameter_count(base_config)
    return OperatingPoint(
        num_layers=num_layers, ranks=ranks, head_dim=head_dim,
        kv_bytes_per_token_base=kv.base, kv_bytes_per_token_lisa=kv.lisa, key_cache_saving=1 - keys.ratio,
        parameters_base=base, parameters_compact=base - dropped + added,
        fidelity=(config.layer_scores or {}).get("fidelity"),
    )


def model_operating_point(model: Any, adapter_name: str | None = None) -> OperatingPoint:
    """`operating_point` of a LiSA `PeftModel` (its active adapter unless named), counting the base parameters."""
    adapter_name = adapter_name or model.active_adapter
    base = model.get_base_model()
    return operating_point(model.peft_config[adapter_name], base.config, base_parameters=base_parameter_count(model))


__all__ = ["OperatingPoint", "model_operating_point", "operating_point", "rank_text"]
