"""Model cards and `push_to_hub` for LiSA models (`install_hub_hooks`, run by `import lisa_peft`).

The compact model (`LisaLlamaForCausalLM`) gets the same from here, so that the model class itself never
touches the Hub: its `save_pretrained` is wrapped to write the compact model card (a README.md not written by
lisa-peft is kept), and its `push_to_hub` uploads the saved folder with that card in one commit.

PEFT writes README.md in `PeftModel.save_pretrained` through `PeftModel.create_or_update_model_card(output_dir)`,
a generic card. transformers' `PushToHubMixin.push_to_hub` (which `PeftModel` inherits) then *overwrites* that
README with the repo's current card, or with a generic "transformers model" card for a new repo. We wrap both
methods once on `PeftModel`: for a model whose adapters are LiSA they write / upload the LiSA card
(`lisa_peft.integrations.hub.model_card`, `lisa_peft.integrations.hub.push.push_model_to_hub`); for every
other model they call PEFT's / transformers' original unchanged. The wrappers remember the original
(`lisa_peft.integrations.patching`), so re-importing or reloading lisa_peft re-wraps the original instead
of stacking wrappers. If rendering the LiSA card fails
during `save_pretrained`, the wrapper warns and writes PEFT's card: a save never fails over its README (PEFT
writes the card before the weights).
"""

from __future__ import annotations

import functools
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..patching import wrap_method
from ..registration import has_lisa_adapter
from . import model_card
from .push import _upload, push_model_to_hub


def _card_hook(original: Callable) -> Callable:
    @functools.wraps(original)
    def create_or_update_model_card(self: Any, output_dir: str) -> None:
        if not has_lisa_adapter(self):
            return original(self, output_dir)
        try:
            model_card.write_model_card(self, output_dir)
        except Exception as err:  # a save must not fail over its README
            warnings.warn(
                f"lisa-peft could not write the LiSA model card ({type(err).__name__}: {err}); "
                "PEFT's generic card was written instead.",
                stacklevel=3,
            )
            original(self, output_dir)
        return None

    return create_or_update_model_card


def _push_hook(original: Callable) -> Callable:
    @functools.wraps(original)
    def push_to_hub(self: Any, repo_id: str, *args: Any, **kwargs: Any) -> Any:
        if not has_lisa_adapter(self):
            return original(self, repo_id, *args, **kwargs)
        return push_model_to_hub(self, repo_id, *args, **kwargs)

    return push_to_hub


def _compact_save_hook(original: Callable) -> Callable:
    @functools.wraps(original)
    def save_pretrained(self: Any, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        original(self, save_directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        from .compact_card import render_compact_card

        readme = Path(save_directory) / "README.md"
        if not readme.is_file() or model_card.MODEL_CARD_MARKER in readme.read_text(encoding="utf-8"):
            readme.write_text(render_compact_card(self), encoding="utf-8")

    return save_pretrained


def _compact_push_hook(original: Callable) -> Callable:
    @functools.wraps(original)
    def push_to_hub(
        self: Any,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
        tokenizer: Any = None,
    ) -> Any:
        """Upload the compact model (and `tokenizer`, when given) with the LiSA model card; returns the `CommitInfo`.

        Same arguments as transformers' `push_to_hub`; the card (`lisa_peft.integrations.hub.compact_card`) names
        the base model, the LiSA layers, the rank and the measured sizes, and its first lines say to install and
        import lisa_peft.
        """
        from .compact_card import render_compact_card

        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, max_shard_size=max_shard_size, tokenizer=tokenizer)
            Path(tmp, "README.md").write_text(render_compact_card(self, repo_id=repo_id, tags=tags), encoding="utf-8")
            files: dict[str, bytes | str] = {
                path.relative_to(tmp).as_posix(): str(path) for path in sorted(Path(tmp).rglob("*")) if path.is_file()
            }
            return _upload(
                files, repo_id, revision=revision, private=private, token=token,
                commit_message=commit_message or "Upload compact LiSA model", commit_description=commit_description,
                create_pr=create_pr,
            )

    return push_to_hub


def install_hub_hooks() -> None:
    """Wrap `PeftModel.create_or_update_model_card` and `PeftModel.push_to_hub` for LiSA, and give the compact
    model (`LisaLlamaForCausalLM`) its card on `save_pretrained` and its `push_to_hub` (idempotent)."""
    from peft import PeftModel

    from ...compact.lisa_llama import LisaLlamaForCausalLM

    wrap_method(PeftModel, "create_or_update_model_card", _card_hook)
    wrap_method(PeftModel, "push_to_hub", _push_hook)
    wrap_method(LisaLlamaForCausalLM, "save_pretrained", _compact_save_hook)
    wrap_method(LisaLlamaForCausalLM, "push_to_hub", _compact_push_hook)
