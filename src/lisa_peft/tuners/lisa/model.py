"""`LisaModel`: the PEFT tuner that turns self-attention of chosen LLaMA layers into LiSA layers."""

from __future__ import annotations

import math
import re
import types
from collections.abc import Callable
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from . import chunked, continuous_batching
from . import transformers_compat as compat
from .checkpoint import check_lisa_state_dict
from .config import KERNEL_MODES, LisaConfig, base_model_shape, base_shape_mismatch
from .layer import _MERGE_ERROR, ROLE_ANCHOR, ROLE_LISA, LisaAttention, set_adapter_setting
from .state import LisaForwardState

# transformers `model_type`s whose attention follows the LLaMA contract (q/k/v/o projections,
# rotate-half RoPE from `position_embeddings`, GQA through `num_key_value_heads`).
SUPPORTED_MODEL_TYPES = ("llama",)
_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn$")
_HOOK_ATTR = "_lisa_state_hook"
WEIGHTED_ADAPTER_ERROR = (
    "add_weighted_adapter cannot combine LiSA adapters: a LiSA adapter is not a weight delta that can be scaled and "
    "summed, but a replacement of the attention computation (head-alignment FFN over the previous layer's logits "
    "plus low-rank rotary Q/K), and each adapter may replace different layers. Use one LiSA adapter at a time "
    "(model.set_adapter(name)); to combine LiSA with LoRA adapters, load them side by side (README: LiSA with LoRA)."
)


def default_rank(head_dim: int) -> int:
    """head_dim / 6 rounded up to an even number (the paper's 6x compression of Q and K)."""
    return 2 * math.ceil(head_dim / 12)


def anchor_layers(lisa_layers: list[int]) -> list[int]:
    """The full layers right before each run of LiSA layers."""
    lisa = set(lisa_layers)
    return sorted(i - 1 for i in lisa if i - 1 not in lisa)


@torch.no_grad()
def rotary_planes_by_weight_norm(attn: nn.Module, num_planes: int) -> torch.Tensor:
    """Pick the `num_planes` rotary planes per KV head with the largest ||Wq plane|| * ||Wk plane||.

    For query head h and plane j (dims j and j + D/2) the score contribution is bounded by the
    product of the row-pair norms; it is summed over the query heads of each KV group.
    Returns [G, num_planes] plane indices in [0, D/2), sorted ascending.
    """
    d = attn.head_dim
    wq = attn.q_proj.weight.detach().float().view(-1, d, attn.q_proj.weight.shape[1])
    wk = attn.k_proj.weight.detach().float().view(-1, d, attn.k_proj.weight.shape[1])
    h, g = wq.shape[0], wk.shape[0]

    def plane_norms(w: torch.Tensor) -> torch.Tensor:
        sq = w.pow(2).sum(-1)  # [heads, D]
        return (sq[:, : d // 2] + sq[:, d // 2 :]).sqrt()  # [heads, D/2]

    q_norm = plane_norms(wq).view(g, h // g, d // 2).sum(1)
    score = q_norm * plane_norms(wk)
    return score.topk(num_planes, dim=-1).indices.sort(dim=-1).values


def backbone(model: nn.Module) -> nn.Module:
    """The module that owns the `layers` ModuleList of decoder layers (LlamaModel)."""
    for module in model.modules():
        if isinstance(getattr(module, "layers", None), nn.ModuleList) and hasattr(module, "rotary_emb"):
            return module
    raise ValueError("Could not find the decoder stack (a module with `layers` and `rotary_emb`) in the model.")


def add_forward_state(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of the decoder stack: a fresh LisaForwardState for every forward pass."""
    kwargs["lisa_state"] = LisaForwardState()
    return args, kwargs


def set_kernel_mode(model: torch.nn.Module, mode: str, adapter_name: str | None = None) -> None:
    """Switch `LisaConfig.kernel` of a loaded LiSA model (its active adapter unless `adapter_name`)."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernel must be one of {KERNEL_MODES}, got {mode!r}.")
    set_adapter_setting(model, adapter_name, "kernel", "lisa_kernel", mode)



def remove_lisa_adapter(model: nn.Module, adapter_name: str) -> None:
    """Take LiSA adapter `adapter_name` out of `model` (PeftModel or base model with injected adapters).

    LiSA modules left without any adapter go back to their base attention module, and the forward-state
    hook goes when no LiSA module is left: the model is then exactly what it was before the injection.
    """
    for name, module in list(model.named_modules()):
        if not isinstance(module, LisaAttention) or adapter_name not in module.lisa_roles:
            continue
        module.delete_adapter(adapter_name)
        if not module.lisa_roles:
            parent_name, _, child_name = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child_name, module.get_base_layer())
    if not any(isinstance(module, LisaAttention) for module in model.modules()):
        remove_stack_hooks(model)


def install_stack_hooks(model: nn.Module) -> None:
    """Prepare the decoder stack for LiSA layers (once): the forward-state pre-hook, the chunked-prefill
    forward and the continuous-batching guard. `remove_stack_hooks` undoes exactly this."""
    stack = backbone(model)
    if getattr(stack, _HOOK_ATTR, None) is None:
        handle = stack.register_forward_pre_hook(add_forward_state, with_kwargs=True)
        setattr(stack, _HOOK_ATTR, handle)
        stack.forward = types.MethodType(chunked.chunked_stack_forward, stack)  # chunked prefill
    continuous_batching.install_guard(model)  # paged attention cache: refused before generating


def remove_stack_hooks(model: nn.Module) -> None:
    """Undo `install_stack_hooks`: the decoder stack and the model are as they were before any LiSA layer."""
    continuous_batching.remove_guard(model)
    stack = backbone(model)
    handle = getattr(stack, _HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
        delattr(stack, _HOOK_ATTR)
    stack.__dict__.pop("forward", None)  # back to the class's forward

_COMPACT_BUILDER: Callable[..., nn.Module] | None = None


def register_compact_builder(builder: Callable[..., nn.Module]) -> None:
    """Set what `LisaModel.merge_and_unload` calls (`lisa_peft.compact.merge_lisa_adapter`, registered by
    `import lisa_peft`): the tuner package itself knows nothing of the compact model class above it."""
    global _COMPACT_BUILDER
    _COMPACT_BUILDER = builder


def _grows_dynamically(kwargs: dict[str, Any], generation_config: Any) -> bool:
    """Whether `generate` will use a growing (dynamic) cache, the only kind it asks transformers to prefill in
    chunks on its own (a static cache is prefilled in chunks when the call passes `prefill_chunk_size`)."""
    implementation = kwargs.get("cache_implementation", getattr(generation_config, "cache_implementation", None))
    passed = compat.pop_cache(dict(kwargs))
    return implementation in (None, "dynamic") and (passed is None or isinstance(passed, compat.DynamicCache))


class LisaModel(BaseTuner):
    """Creates LiSA layers from a pre-trained LLaMA-architecture model (the method: docs/method.md).

    Example:
        ```py
        >>> import lisa_peft
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, lisa_peft.LisaConfig(lisa_layers=[8, 9, 10, 11]))
        ```
    """

    prefix: str = "lisa_"
    tuner_layer_cls = LisaAttention
    target_module_mapping: dict[str, list[str]] = {}

    # ------------------------------------------------------------------ config and injection
    def _prepare_adapter_config(self, peft_config: LisaConfig, model_config: dict) -> LisaConfig:
        model_type = model_config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"LiSA supports LLaMA-architecture models (model_type in {list(SUPPORTED_MODEL_TYPES)}); this model "
                f"has model_type={model_type!r}."
            )
        if peft_config.lisa_layers == "auto":
            raise ValueError(
                "lisa_layers='auto' chooses layers from calibration data, which get_peft_model does not have. "
                "Use lisa_peft.convert(model, tokenizer, config, calibration_texts=...) instead."
            )
        shape = base_model_shape(model_config)  # recorded so that loading onto another shape fails clearly
        mismatch = base_shape_mismatch(peft_config.base_model_shape, shape)
        if mismatch:
            raise ValueError(
                f"This LiSA adapter was made for a base model of another shape: {mismatch}. Load it onto the base "
                "model named in its adapter_config.json (base_model_name_or_path)."
            )
        peft_config.base_model_shape = shape
        num_layers = model_config["num_hidden_layers"]
        out_of_range = [i for i in peft_config.lisa_layers if i >= num_layers]
        if out_of_range:
            raise ValueError(
                f"`lisa_layers` contains {out_of_range}, but the model has {num_layers} layers (0..{num_layers - 1})."
            )
        heads = model_config["num_attention_heads"]
        head_dim = model_config.get("head_dim") or model_config["hidden_size"] // heads
        if peft_config.r is None:
            peft_config.r = default_rank(head_dim)
        too_wide = {i: rank for i, rank in peft_config.ranks().items() if rank > head_dim}
        if too_wide:
            raise ValueError(
                f"Rank larger than the head dimension {head_dim} (layer: rank) {too_wide}: the low-rank Q/K keep at "
                f"most head_dim/2 rotary planes. Use even ranks <= {head_dim} (`r`, `layer_ranks`)."
            )
        if peft_config.rank_allocation == "sensitivity" and not peft_config.layer_ranks:
            raise ValueError(
                "rank_allocation='sensitivity' shares the rank budget by layer sensitivity measured on calibration "
                "text, which get_peft_model does not have. Use lisa_peft.convert(model, tokenizer, config, "
                "calibration_texts=...), or give the ranks yourself in `layer_ranks`."
            )
        if peft_config.ffn_hidden is None:
            peft_config.ffn_hidden = 2 * heads
        if peft_config.rotary_planes is None:
            peft_config.rotary_planes = {}
        missing_planes = [i for i in peft_config.lisa_layers if str(i) not in peft_config.rotary_planes]
        if peft_config.init_lisa_weights == "calibrate" and missing_planes:
            raise ValueError(
                "init_lisa_weights='calibrate' fits the LiSA weights on calibration text, which get_peft_model does "
                "not have. Use lisa_peft.convert(model, tokenizer, config, calibration_texts=...), or "
                "init_lisa_weights='identity' here."
            )
        wrapped = sorted(set(peft_config.lisa_layers) | set(anchor_layers(peft_config.lisa_layers)))
        peft_config.target_modules = r"(.*\.)?layers\.(" + "|".join(map(str, wrapped)) + r")\.self_attn"
        return peft_config

    def _check_new_adapter_config(self, config: LisaConfig) -> None:
        if not isinstance(config, LisaConfig):
            raise TypeError(f"LisaModel takes a LisaConfig, got {type(config).__name__}.")

    def _create_and_replace(
        self,
        peft_config: LisaConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        match = _LAYER_KEY.search(current_key)
        if match is None:
            raise ValueError(f"LiSA wraps `layers.<i>.self_attn` modules only; got {current_key!r}.")
        layer_idx = int(match.group(1))
        base = target.get_base_layer() if isinstance(target, LisaAttention) else target
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "config"):
            if not hasattr(base, name):
                raise ValueError(
                    f"{current_key} ({type(base).__name__}) does not follow the LLaMA attention contract: missing "
                    f"`{name}`. LiSA supports model types {list(SUPPORTED_MODEL_TYPES)}."
                )
        role = ROLE_LISA if layer_idx in peft_config.lisa_layers else ROLE_ANCHOR
        planes = self._resolve_planes(peft_config, base, layer_idx) if role == ROLE_LISA else None
        if isinstance(target, LisaAttention):
            target.update_layer(adapter_name, role, peft_config, planes)
            return
        new_module = LisaAttention(base, layer_idx)
        new_module.update_layer(adapter_name, role, peft_config, planes)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _resolve_planes(config: LisaConfig, attn: nn.Module, layer_idx: int) -> torch.Tensor:
        """[G, r/2] rotary planes of a LiSA layer (its own r): from the config if saved there, else by weight norms."""
        key = str(layer_idx)
        num_kv = attn.config.num_key_value_heads
        half = config.rank_of(layer_idx) // 2
        if key in config.rotary_planes:
            planes = torch.tensor(config.rotary_planes[key], dtype=torch.long)
            if planes.shape != (num_kv, half) or planes.min() < 0 or planes.max() >= attn.head_dim // 2:
                raise ValueError(
                    f"rotary_planes[{key!r}] has shape {tuple(planes.shape)} / values out of range; expected "
                    f"[{num_kv}][{half}] plane indices in [0, {attn.head_dim // 2}). The adapter was made for a "
                    "model of a different shape."
                )
            return planes
        if attn.q_proj.weight.device.type == "meta":
            raise ValueError(
                f"Layer {layer_idx} has no weights yet (meta device), so its rotary planes cannot be chosen. Load the "
                "base weights first, or give `rotary_planes` for every LiSA layer in the config."
            )
        planes = rotary_planes_by_weight_norm(attn, half)
        config.rotary_planes[key] = planes.tolist()
        return planes

    def _post_injection_hook(self, model: nn.Module, config: LisaConfig, adapter_name: str) -> None:
        install_stack_hooks(model)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        setattr(parent, child_name, new_module)
        if not isinstance(new_module, LisaAttention):  # unloading: nothing to move
            return
        device = new_module.base_layer.q_proj.weight.device
        for name, module in new_module.named_modules():
            if self.prefix in name and device.type != "meta":
                module.to(device)

    # ------------------------------------------------------------------ generation
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's `generate`, with transformers' chunked prefill at `prefill_chunk_size`.

        Set only when LiSA layers are active, a cache is used (transformers refuses chunking without
        one) and neither the call nor the generation config sets `prefill_chunk_size` itself. (Without
        it the decoder stack would still chunk a long prefill itself, `chunked.py`.)
        """
        size = chunked.active_chunk_size(backbone(self.model))
        generation_config = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        use_cache = kwargs.get("use_cache", getattr(generation_config, "use_cache", True))
        if (
            size
            and compat.SUPPORTS_PREFILL_CHUNKING
            and use_cache is not False
            and "prefill_chunk_size" not in kwargs
            and getattr(generation_config, "prefill_chunk_size", None) is None
            and _grows_dynamically(kwargs, generation_config)
        ):
            kwargs["prefill_chunk_size"] = size
        return self.model.generate(*args, **kwargs)

    # ------------------------------------------------------------------ PEFT semantics
    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) != 1:
            raise ValueError(
                f"LiSA replaces attention, so exactly one LiSA adapter can be active at a time; got {names}."
            )
        super().set_adapter(adapter_name, inference_mode=inference_mode)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """An explicit `lisa_dtype` wins; otherwise PEFT's rule (half-precision adapters upcast to float32)."""
        lisa_dtype = self.peft_config[adapter_name].lisa_dtype
        if lisa_dtype is None:
            super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
            return
        dtype = getattr(torch, lisa_dtype)
        for module in self.model.modules():
            if isinstance(module, LisaAttention):
                for name in module.adapter_layer_names:
                    container = getattr(module, name)
                    if adapter_name in container:
                        container[adapter_name].to(dtype)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: LisaConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """PEFT's load hook (`set_peft_model_state_dict`): refuse a checkpoint with missing, misshapen,
        non-float or non-finite LiSA tensors before any weight is copied (`checkpoint.check_lisa_state_dict`)."""
        check_lisa_state_dict(model, adapter_name, state_dict)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """The compact LiSA model of one adapter: a `LisaLlamaForCausalLM` without the unused base Q/K.

        LiSA is not a weight delta, so nothing is merged into the base weights: the returned transformers model
        (`lisa_peft.compact.merge_lisa_adapter`) holds, in each LiSA layer, the low-rank Q/K, the head FFN and the
        base V/O, and computes exactly what this PeftModel computes. It shares this model's tensors (no copy);
        this PeftModel is left unchanged. With several adapters, name one: `adapter_names=["name"]`.
        `progressbar` is accepted for PEFT compatibility (the merge is instant).
        """
        if _COMPACT_BUILDER is None:
            raise RuntimeError("merge_and_unload() builds the compact LiSA model, which `import lisa_peft` registers.")
        return _COMPACT_BUILDER(self, adapter_names=adapter_names, safe_merge=safe_merge)

    def _check_merge_allowed(self) -> None:
        raise ValueError(_MERGE_ERROR)

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Not possible for LiSA (see `WEIGHTED_ADAPTER_ERROR`)."""
        raise ValueError(WEIGHTED_ADAPTER_ERROR)

    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs: Any) -> nn.Module:
        if merge:
            self._check_merge_allowed()
        model = super()._unload_and_optionally_merge(merge=False, **kwargs)
        remove_stack_hooks(model)
        return model
