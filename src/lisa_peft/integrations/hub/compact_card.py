"""Model card (README.md) of a compact LiSA model, rendered from the template `model_cards/lisa_compact.md`.

The card's first lines say what to install and import; its metadata names the base model and the relation to
it (`base_model_relation: finetune`: the base weights with the LiSA adapter merged in), and it lists the LiSA
layers, the rank and the parameter bytes measured on the model (`lisa_peft.compact.merge.compact_sizes`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .model_card import (
    CARD_TAGS,
    MODEL_CARD_MARKER,
    REPO_ID_PLACEHOLDER,
    _environment,
    _layer_map,
    hub_model_id,
    rank_summary,
    template_path,
)

COMPACT_TEMPLATE_NAME = "lisa_compact.md"
COMPACT_TAGS = (*CARD_TAGS[:1], "lisa-peft", "lisa_llama", *CARD_TAGS[2:])


def render_compact_card(model: Any, repo_id: str | None = None, tags: list[str] | None = None) -> str:
    """README.md text for a `LisaLlamaForCausalLM` (`repo_id` goes into the usage snippet; `tags`: extra tags)."""
    from huggingface_hub import ModelCardData

    from ...compact.lisa_llama.sizes import compact_sizes
    from ...version import __version__

    config = model.config
    sizes = compact_sizes(model)
    name = config.lisa_base_model
    base_hub_id = hub_model_id(name)
    title = f"Compact LiSA model of {base_hub_id or (Path(name).name if name else 'a LLaMA-architecture model')}"
    card_data = ModelCardData(
        library_name="transformers", base_model=base_hub_id, base_model_relation="finetune" if base_hub_id else None,
        pipeline_tag="text-generation", tags=list(dict.fromkeys([*COMPACT_TAGS, *(tags or [])])),
    )
    lisa_dtype = config.lisa_dtype or str(next(model.parameters()).dtype).removeprefix("torch.")
    context = {
        "card_data": card_data.to_yaml(),
        "marker": MODEL_CARD_MARKER,
        "lisa_peft_version": __version__,
        "title": title,
        "repo_id": repo_id or REPO_ID_PLACEHOLDER,
        "base": {"name": name, "hub_id": base_hub_id},
        "layers": _layer_map(config.num_hidden_layers, list(config.lisa_layers)),
        "cfg": {
            **rank_summary({i: config.lisa_rank_of(i) for i in config.lisa_layers}, config.lisa_head_dim),
            "head_dim": config.lisa_head_dim, "compression": sizes.qk_compression, "share": config.lisa_share,
            "ffn_hidden": config.lisa_ffn_hidden,
            "lisa_dtype": lisa_dtype,
        },
        "sizes": sizes,
    }
    template = template_path(COMPACT_TEMPLATE_NAME).read_text(encoding="utf-8")
    text = _environment().from_string(template).render(**context)
    return re.sub(r"\n{3,}", "\n\n", text)


__all__ = ["COMPACT_TEMPLATE_NAME", "render_compact_card"]
