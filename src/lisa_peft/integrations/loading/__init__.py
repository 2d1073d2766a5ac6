"""Loading guards: every way of loading a LiSA adapter refuses what would silently change the model.

* `config_file`: adapter_config.json that is not JSON -> `InvalidAdapterConfigError` naming the file;
  keys a LiSA config does not know -> a warning naming them (and they are dropped).
* `weights`: where an adapter's `adapter_model.safetensors` is; a folder / repo with only
  `adapter_model.bin` is refused before anything is unpickled.
* `hooks`: `install_loading_guards()` wraps PEFT's `PeftConfig.from_json_file`, `PeftModel.load_adapter`
  (behind `PeftModel.from_pretrained`, `AutoPeftModel*`, `PeftMixedModel.load_adapter` and
  `lisa_peft.from_pretrained`) and transformers' `load_adapter`. The tensors themselves are checked by
  the tuner (`tuners.lisa.checkpoint`), with the file named here.
* `compact_guard`: a compact LiSA folder loads only into `LisaLlamaForCausalLM`, never into a model class
  that would initialise its missing W_q / W_k at random (`install_compact_class_guard()`).
"""

from .compact_guard import CompactModelClassError, install_compact_class_guard
from .hooks import install_loading_guards

__all__ = ["CompactModelClassError", "install_compact_class_guard", "install_loading_guards"]
