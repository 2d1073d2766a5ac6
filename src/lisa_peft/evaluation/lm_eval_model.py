"""lm-evaluation-harness model ``hf-lisa``: a Hugging Face causal LM with a LiSA (or any PEFT) adapter.

Importing this module registers the model name with lm_eval's `register_model` and imports `lisa_peft`
(which registers the LISA PEFT method), so in that process

    lm_eval.simple_evaluate(model="hf-lisa", model_args="pretrained=BASE,adapter=ADAPTER", tasks=[...])

loads the base with transformers and the adapter with `PeftModel.from_pretrained`. lm_eval's plain
``hf`` model already takes ``peft=ADAPTER``, but a LiSA adapter only loads where `lisa_peft` has been
imported; the ``lm_eval`` console script does not import it, ``lisa-peft eval`` does
(`lisa_peft.commands.eval`). ``adapter=`` is an alias of ``peft=``.
"""

from __future__ import annotations

import os

from lisa_peft.extras import require

require("lm_eval", "eval", "The lm-evaluation-harness model `hf-lisa`")
from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

import lisa_peft  # noqa: E402, F401  (registers the LISA PEFT method before any adapter is loaded)
from lisa_peft.evaluation.metrics.core import lisa_layer_indices  # noqa: E402

__all__ = ["HFLisaLM"]


@register_model("hf-lisa")
class HFLisaLM(HFLM):
    """`HFLM` whose ``adapter`` (path or Hub id; alias of ``peft``) may be a LiSA adapter."""

    def __init__(self, pretrained, adapter: str | None = None, peft: str | None = None, **kwargs) -> None:
        if adapter and peft and adapter != peft:
            raise ValueError(f"hf-lisa: adapter={adapter!r} and peft={peft!r} disagree; give one of them.")
        super().__init__(pretrained, peft=adapter or peft, **kwargs)

    @property
    def lisa_layers(self) -> list[int]:
        """Decoder layers whose attention LiSA replaces: of the loaded LiSA adapter, or of a compact LiSA model
        (model_type "lisa_llama", `pretrained=` a folder saved from `merge_and_unload()`); [] otherwise."""
        config = getattr(self.model, "config", None)
        if getattr(config, "model_type", None) == "lisa_llama":
            return list(config.lisa_layers)
        return lisa_layer_indices(self.model)

    def get_model_info(self) -> dict:
        """HFLM's model info, without asking the Hub for the commit of local folders (offline-safe)."""
        model = self.model
        info = {
            "model_num_parameters": sum(p.numel() for p in model.parameters()),
            "model_dtype": str(getattr(model, "dtype", "")),
            "model_revision": self.revision,
            "model_sha": _hub_sha(self.pretrained, self.revision),
        }
        if self.peft:
            info["peft_sha"] = _hub_sha(self.peft, self.revision)
        if self.lisa_layers:
            info["lisa_layers"] = self.lisa_layers
        return info


def _hub_sha(name_or_path, revision: str | None) -> str:
    """Commit sha of a Hub repo; "" for local folders, model objects, or when the Hub is unreachable."""
    if not isinstance(name_or_path, str) or os.path.isdir(name_or_path):
        return ""
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(repo_id=name_or_path, revision=revision).sha or ""
    except Exception:  # noqa: BLE001  (offline, private, or not a repo id: the sha is informational)
        return ""
