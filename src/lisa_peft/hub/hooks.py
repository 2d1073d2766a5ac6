"""Model cards and `push_to_hub` for LiSA models (`install_hub_hooks`, run by `import lisa_peft`).

PEFT writes README.md in `PeftModel.save_pretrained` through `PeftModel.create_or_update_model_card(output_dir)`,
a generic card. transformers' `PushToHubMixin.push_to_hub` (which `PeftModel` inherits) then *overwrites* that
README with the repo's current card, or with a generic "transformers model" card for a new repo. We wrap both
methods once on `PeftModel`: for a model whose adapters are LiSA they write / upload the LiSA card
(`lisa_peft.model_card`, `lisa_peft.hub.push.push_model_to_hub`); for every other model they call PEFT's /
transformers' original unchanged. The wrappers remember the original (`lisa_peft.patching`), so re-importing
or reloading lisa_peft re-wraps the original instead of stacking wrappers. If rendering the LiSA card fails
during `save_pretrained`, the wrapper warns and writes PEFT's card: a save never fails over its README (PEFT
writes the card before the weights).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

from .. import model_card
from ..patching import wrap_method
from ..registration import has_lisa_adapter
from .push import push_model_to_hub


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


def install_hub_hooks() -> None:
    """Wrap `PeftModel.create_or_update_model_card` and `PeftModel.push_to_hub` for LiSA (idempotent)."""
    from peft import PeftModel

    wrap_method(PeftModel, "create_or_update_model_card", _card_hook)
    wrap_method(PeftModel, "push_to_hub", _push_hook)
