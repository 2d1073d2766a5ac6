"""`LisaLlamaConfig`: the config of the compact LiSA LLaMA model (model_type "lisa_llama").

A `LlamaConfig` plus the fields of the LiSA adapter it was merged from. Every other key is the base model's,
so `config.json` of a compact folder reads as the base config with these additions:

* `lisa_layers`: decoder layers whose attention is LiSA (no base W_q / W_k there);
* `lisa_r`: low-rank Q/K width per head (r/2 rotary planes); `lisa_layer_ranks`: per-layer widths that
  override it (key: layer index as a string; None = `lisa_r` everywhere); `lisa_ffn_hidden`: head FFN width F;
* `lisa_share`: "logits" or "probs"; `lisa_kernel`: "auto", "triton" or "torch" (`tuners/lisa/dispatch.py`);
* `lisa_rotary_planes`: per LiSA layer (key: layer index as a string) the kept plane indices [G][r/2];
* `lisa_dtype`: dtype of the LiSA weights when it differs from the model's (float32 LiSA weights on a
  bf16/fp16 base, PEFT's rule), None otherwise; `lisa_base_model`: the base model's name or path.
"""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig

from ...tuners.lisa.config import KERNEL_MODES, LISA_DTYPES, SHARE_MODES

# The LiSA modules of a compact LiSA layer (the rest are the base V and O projections).
LISA_MODULE_NAMES = ("lisa_q_proj", "lisa_k_proj", "lisa_ffn_up", "lisa_ffn_down")


class LisaLlamaConfig(LlamaConfig):
    """LLaMA config + LiSA fields (see module docstring)."""

    model_type = "lisa_llama"

    lisa_layers: list[int] | None = None
    lisa_r: int | None = None
    lisa_layer_ranks: dict | None = None
    lisa_ffn_hidden: int | None = None
    lisa_share: str = "logits"
    lisa_kernel: str = "auto"
    lisa_rotary_planes: dict | None = None
    lisa_dtype: str | None = None
    lisa_base_model: str | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        self.lisa_layers = sorted(int(i) for i in (self.lisa_layers or []))
        self.lisa_rotary_planes = {str(k): v for k, v in (self.lisa_rotary_planes or {}).items()}
        if self.lisa_layer_ranks is not None:
            self.lisa_layer_ranks = {str(k): v for k, v in self.lisa_layer_ranks.items()}
        super().__post_init__(**kwargs)
        self._check_lisa_fields()

    def _check_lisa_fields(self) -> None:
        """Refuse a LiSA config that cannot describe a model (checked on every load, before any weight)."""
        if not self.lisa_layers:
            return  # an empty LiSA config is a plain LLaMA (used by transformers when it builds defaults)
        problems = []
        if self.lisa_share not in SHARE_MODES:
            problems.append(f"lisa_share={self.lisa_share!r} (expected one of {SHARE_MODES})")
        if self.lisa_kernel not in KERNEL_MODES:
            problems.append(f"lisa_kernel={self.lisa_kernel!r} (expected one of {KERNEL_MODES})")
        if self.lisa_dtype is not None and self.lisa_dtype not in LISA_DTYPES:
            problems.append(f"lisa_dtype={self.lisa_dtype!r} (expected one of {LISA_DTYPES})")
        if not isinstance(self.lisa_r, int) or self.lisa_r <= 0 or self.lisa_r % 2:
            problems.append(f"lisa_r={self.lisa_r!r} (expected a positive even integer)")
        for key, rank in sorted((self.lisa_layer_ranks or {}).items()):
            if not key.isdigit() or int(key) not in self.lisa_layers:
                problems.append(f"lisa_layer_ranks[{key!r}] names no LiSA layer (lisa_layers {self.lisa_layers})")
            elif isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0 or rank % 2:
                problems.append(f"lisa_layer_ranks[{key!r}]={rank!r} (expected a positive even integer)")
        if not isinstance(self.lisa_ffn_hidden, int) or self.lisa_ffn_hidden <= 0:
            problems.append(f"lisa_ffn_hidden={self.lisa_ffn_hidden!r} (expected a positive integer)")
        bad_layers = [i for i in self.lisa_layers if i < 1 or i >= self.num_hidden_layers]
        if bad_layers:
            problems.append(f"lisa_layers {bad_layers} outside 1..{self.num_hidden_layers - 1}")
        missing = [i for i in self.lisa_layers if str(i) not in self.lisa_rotary_planes]
        if missing:
            problems.append(f"lisa_rotary_planes has no entry for layers {missing}")
        kv_heads, head_dim = self.num_key_value_heads, self.lisa_head_dim
        for key, planes in sorted(self.lisa_rotary_planes.items()):
            half = self.lisa_rank_of(int(key)) // 2 if key.isdigit() else 0
            values = [v for row in planes for v in row]
            if len(planes) != kv_heads or any(len(row) != half for row in planes) or not all(
                isinstance(v, int) and 0 <= v < head_dim // 2 for v in values
            ):
                problems.append(
                    f"lisa_rotary_planes[{key!r}] must be [{kv_heads}][{half}] (KV heads x r/2) plane indices in "
                    f"[0, {head_dim // 2})"
                )
        if problems:
            raise ValueError("Invalid LiSA LLaMA config (config.json of a compact LiSA model): " + "; ".join(problems))

    def lisa_rank_of(self, layer_idx: int) -> int:
        """Low-rank Q/K width of LiSA layer `layer_idx`: its `lisa_layer_ranks` entry, else `lisa_r`."""
        rank = (self.lisa_layer_ranks or {}).get(str(layer_idx), self.lisa_r)
        return rank if isinstance(rank, int) else 0

    @property
    def lisa_head_dim(self) -> int:
        """Head dimension D of the base attention."""
        return getattr(self, "head_dim", None) or self.hidden_size // self.num_attention_heads


__all__ = ["LisaLlamaConfig"]
