"""lisa-peft: LiSA (cross-layer attention sharing) as a Hugging Face PEFT method.

`import lisa_peft` registers the PEFT method `LISA` (idempotent), so `get_peft_model`,
`PeftModel.from_pretrained`, `PeftConfig.from_pretrained` and `AutoPeftModelForCausalLM` handle
LiSA adapters.

Example (tiny random model; the same code runs on any LLaMA checkpoint):

>>> import torch, transformers
>>> from peft import get_peft_model
>>> from lisa_peft import LisaConfig
>>> base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
...     hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
...     num_key_value_heads=2, vocab_size=128))
>>> model = get_peft_model(base, LisaConfig(lisa_layers=[3, 4, 5]))
>>> model.peft_config["default"].r  # head_dim 16 -> 16/6 rounded up to even
4
>>> ids = torch.tensor([[1, 2, 3, 4]])
>>> model(ids).logits.shape
torch.Size([1, 4, 128])
"""

from . import compact, transformers_compat  # noqa: F401  (compact registers merge_and_unload's builder)
from .convert import convert
from .hub import from_pretrained, install_hub_hooks, push_adapter
from .loading import install_loading_guards
from .mixed import install_mixed_model_guard
from .models.lisa_llama import LisaLlamaConfig, LisaLlamaForCausalLM, register_lisa_llama
from .registration import register_lisa
from .task_types import install_task_type_guard
from .tuners.lisa import LisaAttention, LisaConfig, LisaModel
from .version import __version__

transformers_compat.check_transformers_version()
register_lisa()
install_hub_hooks()
install_loading_guards()
install_mixed_model_guard()
install_task_type_guard()
register_lisa_llama()

__all__ = [
    "LisaAttention",
    "LisaConfig",
    "LisaLlamaConfig",
    "LisaLlamaForCausalLM",
    "LisaModel",
    "__version__",
    "convert",
    "from_pretrained",
    "push_adapter",
]
