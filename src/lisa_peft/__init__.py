"""lisa-peft: LiSA (cross-layer attention sharing) as a Hugging Face PEFT method.

`import lisa_peft` registers the PEFT method `LISA` (idempotent), so `get_peft_model`,
`PeftModel.from_pretrained`, `PeftConfig.from_pretrained` and `AutoPeftModelForCausalLM` handle
LiSA adapters.

The package, by layer: `tuners.lisa` (the method: config, layer, model, as PEFT's tuners),
`integrations` (PEFT registration, transformers compatibility, Hub, loading guards), `compact`
(the model `merge_and_unload()` returns), `pipeline` (conversion, training, recipes), `evaluation`
(fidelity, zero-shot, memory), `commands` (the `lisa-peft` CLI).

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

import sys as _sys

from . import _moved
from .compact import merge as _merge  # noqa: F401  (registers merge_and_unload's builder)
from .compact.lisa_llama import LisaLlamaConfig, LisaLlamaForCausalLM, register_lisa_llama
from .integrations.hub import from_pretrained, install_hub_hooks, push_adapter
from .integrations.loading import install_compact_class_guard, install_loading_guards
from .integrations.mixed import install_mixed_model_guard
from .integrations.registration import register_lisa
from .integrations.task_types import install_task_type_guard
from .pipeline import convert as _convert_module
from .pipeline.convert import convert
from .tuners.lisa import LisaAttention, LisaConfig, LisaModel, transformers_compat
from .tuners.lisa.chunked import set_prefill_chunk_size
from .tuners.lisa.model import set_kernel_mode
from .version import __version__

_moved.install()
# The old module name `lisa_peft.convert` is registered here, not through the import hook: importing it later
# would set the attribute `lisa_peft.convert` to the module and hide the function of the same name.
_sys.modules.setdefault(f"{__name__}.convert", _convert_module)
transformers_compat.check_transformers_version()
register_lisa()
install_hub_hooks()
install_loading_guards()
install_mixed_model_guard()
install_task_type_guard()
register_lisa_llama()
install_compact_class_guard()

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
    "set_kernel_mode",
    "set_prefill_chunk_size",
]
