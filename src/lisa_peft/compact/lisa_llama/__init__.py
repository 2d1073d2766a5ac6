"""The compact LiSA LLaMA model (model_type "lisa_llama"), registered with transformers' Auto classes."""

from .configuration_lisa_llama import LisaLlamaConfig
from .modeling_lisa_llama import (
    CompactCheckpointError,
    LisaLlamaAnchorAttention,
    LisaLlamaAttention,
    LisaLlamaForCausalLM,
)


def register_lisa_llama() -> None:
    """`AutoConfig` / `AutoModelForCausalLM` learn "lisa_llama". Idempotent; a reload re-points them.
    (That other model classes refuse a compact folder is `lisa_peft.integrations.loading.compact_guard`.)"""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(LisaLlamaConfig.model_type, LisaLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(LisaLlamaConfig, LisaLlamaForCausalLM, exist_ok=True)


__all__ = [
    "CompactCheckpointError",
    "LisaLlamaAnchorAttention",
    "LisaLlamaAttention",
    "LisaLlamaConfig",
    "LisaLlamaForCausalLM",
    "register_lisa_llama",
]
