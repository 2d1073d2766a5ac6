"""The remote-code entry point a compact LiSA folder carries, so that it loads without `import lisa_peft`.

transformers knows the model type "lisa_llama" only after `import lisa_peft`. `save_pretrained` therefore writes
`auto_map` into config.json and a small `modeling_lisa_llama.py` next to it (`REMOTE_CODE`, no model code of
its own: it imports the installed lisa-peft package and re-exports its classes). What a user then gets:

* after `import lisa_peft`: lisa-peft's classes, with or without `trust_remote_code` (transformers prefers
  registered classes over a folder's code);
* without the import, `trust_remote_code=True`: the folder's module imports lisa_peft and the model loads;
  where lisa-peft is not installed, an `ImportError` that names `pip install lisa-peft` and `import lisa_peft`;
* without the import and without `trust_remote_code`: transformers' own question (or error) about running the
  folder's custom code, which the README and this module's docstring explain.

Everything stays local: transformers copies the module into its module cache, nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

REMOTE_CODE_FILE = "modeling_lisa_llama.py"
AUTO_MAP = {
    "AutoConfig": "modeling_lisa_llama.LisaLlamaConfig",
    "AutoModelForCausalLM": "modeling_lisa_llama.LisaLlamaForCausalLM",
}
INSTALL_HINT = "pip install lisa-peft"

REMOTE_CODE = '''"""Remote code of a compact LiSA model (model_type "lisa_llama"), written by lisa-peft {version}.

The model code is the lisa-peft package; this file holds none of its own. It imports lisa_peft, so that
AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True) works without `import lisa_peft`.
Without trust_remote_code: `{install}`, then `import lisa_peft` before from_pretrained.
"""

try:
    import lisa_peft
except ModuleNotFoundError as error:
    if error.name != "lisa_peft":
        raise
    raise ImportError(
        "This folder holds a compact LiSA model (model_type 'lisa_llama', saved by lisa-peft {version}), whose code "
        "is the lisa-peft package, which is not installed here. Run `{install}`, then `import lisa_peft` before "
        "AutoModelForCausalLM.from_pretrained(...)."
    ) from error


class LisaLlamaConfig(lisa_peft.LisaLlamaConfig):
    """lisa-peft's LisaLlamaConfig."""


class LisaLlamaForCausalLM(lisa_peft.LisaLlamaForCausalLM):
    """lisa-peft's LisaLlamaForCausalLM."""

    config_class = LisaLlamaConfig
'''


def remote_code_source() -> str:
    """The text of the folder's `modeling_lisa_llama.py`."""
    from ...version import __version__

    return REMOTE_CODE.format(version=__version__, install=INSTALL_HINT)


def add_auto_map(config: Any) -> None:
    """Point `config.auto_map` (kept entries of other Auto classes) at the folder's remote-code module."""
    config.auto_map = {**(getattr(config, "auto_map", None) or {}), **AUTO_MAP}


__all__ = ["AUTO_MAP", "INSTALL_HINT", "REMOTE_CODE_FILE", "add_auto_map", "remote_code_source"]
