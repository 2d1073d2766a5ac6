"""The compact LiSA LLaMA model (model_type "lisa_llama"), registered with transformers' Auto classes."""

from .configuration_lisa_llama import LisaLlamaConfig
from .loading_guard import CompactModelClassError, install_compact_class_guard
from .modeling_lisa_llama import (
    CompactCheckpointError,
    LisaLlamaAnchorAttention,
    LisaLlamaAttention,
    LisaLlamaForCausalLM,
)


def register_lisa_llama() -> None:
    """`AutoConfig` / `AutoModelForCausalLM` learn "lisa_llama", and other model classes refuse a compact folder
    (`loading_guard`). Idempotent; a reload re-points them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(LisaLlamaConfig.model_type, LisaLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(LisaLlamaConfig, LisaLlamaForCausalLM, exist_ok=True)
    install_compact_class_guard()


__all__ = [
    "CompactCheckpointError",
    "CompactModelClassError",
    "LisaLlamaAnchorAttention",
    "LisaLlamaAttention",
    "LisaLlamaConfig",
    "LisaLlamaForCausalLM",
    "register_lisa_llama",
]
