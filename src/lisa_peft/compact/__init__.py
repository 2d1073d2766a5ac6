"""The compact model: what `merge_and_unload()` returns, a LLaMA model whose LiSA layers drop the base W_q / W_k.

* `lisa_llama`: `LisaLlamaConfig` / `LisaLlamaForCausalLM`, a registered transformers model;
* `merge`: from a LiSA `PeftModel` to that model (`merge_lisa_adapter`), and the parameter sizes;
* `card`: the model card of a compact model.
"""

from .merge import CompactSizes, compact_sizes, merge_lisa_adapter

__all__ = ["CompactSizes", "compact_sizes", "merge_lisa_adapter"]
