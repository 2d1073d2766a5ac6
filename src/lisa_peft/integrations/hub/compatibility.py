"""Does a LiSA adapter fit a base model? (`check_adapter_compatible`)"""

from __future__ import annotations

from typing import Any

from ...tuners.lisa import LisaConfig
from ...tuners.lisa.config import base_model_shape, base_shape_mismatch
from ...tuners.lisa.model import SUPPORTED_MODEL_TYPES
from .errors import IncompatibleAdapterError, NotALisaAdapterError


def check_adapter_compatible(config: Any, base_model: Any) -> None:
    """Raise `IncompatibleAdapterError` if the LiSA adapter `config` does not fit `base_model`.

    base_model: a model (its `.config` is used), a transformers config or a config dict. Checks the
    architecture, the base shape recorded in the adapter (`base_model_shape`: layers, heads, KV heads,
    head_dim, hidden size), the LiSA layer range, `r` against head_dim and the saved rotary planes
    (shape [KV heads][r/2], values below head_dim/2).
    """

    if not isinstance(config, LisaConfig):
        raise NotALisaAdapterError(
            f"check_adapter_compatible needs a LisaConfig, got {type(config).__name__} "
            f"(peft_type {getattr(config, 'peft_type', None)!r})."
        )
    base_config = getattr(base_model, "config", base_model)
    get = base_config.get if isinstance(base_config, dict) else lambda key: getattr(base_config, key, None)
    problems = []
    model_type = get("model_type")
    if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
        problems.append(f"the base model is a {model_type!r} model; LiSA supports {list(SUPPORTED_MODEL_TYPES)}")
    shape = base_model_shape(base_config)
    mismatch = base_shape_mismatch(config.base_model_shape, shape)
    if mismatch:
        problems.append(mismatch)
    layers = config.lisa_layers if isinstance(config.lisa_layers, list) else []
    beyond = [i for i in layers if i >= shape["num_hidden_layers"]]
    if beyond:
        problems.append(f"LiSA layers {beyond} do not exist in a base model with {shape['num_hidden_layers']} layers")
    head_dim, kv_heads = shape["head_dim"], shape["num_key_value_heads"]
    pattern = config.layer_ranks or {}
    too_wide = {k: v for k, v in {"r": config.r, **pattern}.items() if v is not None and v > head_dim}
    if too_wide:
        problems.append(f"ranks {too_wide} (r / layer_ranks) are larger than the base model's head_dim {head_dim}")
    for key, planes in sorted((config.rotary_planes or {}).items(), key=lambda kv: int(kv[0])):
        widths = {len(row) for row in planes}
        values = [v for row in planes for v in row]
        rank = pattern.get(str(key), config.r)
        if len(planes) != kv_heads or (rank is not None and widths != {rank // 2}) or (
            values and max(values) >= head_dim // 2
        ):
            saved = f"[{len(planes)}][{'/'.join(map(str, sorted(widths)))}]"
            problems.append(
                f"rotary_planes[{key!r}] is {saved} with plane indices up to {max(values) if values else '-'}; "
                f"this base needs [{kv_heads}][{(rank or 0) // 2}] (KV heads x r/2) with indices < "
                f"{head_dim // 2} (head_dim/2)"
            )
            break
    if problems:
        made_for = config.base_model_shape or "not recorded"
        raise IncompatibleAdapterError(
            f"This LiSA adapter (base_model_name_or_path={config.base_model_name_or_path!r}) does not fit the base "
            "model: " + "; ".join(problems)
            + f". Adapter made for {made_for}; base model shape {shape}. Load it onto the base model it was made for."
        )
