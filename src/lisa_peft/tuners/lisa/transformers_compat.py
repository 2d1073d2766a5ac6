"""Every use of transformers internals by lisa-peft, in one place.

LiSA layers stand in for LLaMA's attention modules, so they depend on parts of transformers that
are not a stable public API and have changed between releases: the name under which a decoder
layer hands the KV cache to its attention module (`past_key_values` up to 5.23, `cache` from 5.24),
the name of the cache on model outputs, the cache layer classes, the RoPE helper and the attention
implementation flag. Nothing else in lisa-peft imports from transformers' modeling or cache
internals; when a release changes one of them, this file is the one to change.

The cache argument's name is read from the installed `LlamaAttention.forward` signature, not
guessed from a version number, and a missing name is an error at import time rather than a cache
that silently never arrives.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from typing import Any

import torch
import transformers
from packaging.version import Version
from transformers.cache_utils import DynamicCache, DynamicLayer, QuantoQuantizedLayer, StaticLayer

try:  # the base of every quantized cache layer (group-wise and fp8) from transformers 5.2x
    from transformers.cache_utils import BaseQuantizedLayer as _QuantizedLayerBase
except ImportError:  # transformers 5.0: one quantized layer class (quanto and hqq subclass it)
    from transformers.cache_utils import QuantizedLayer as _QuantizedLayerBase
from transformers.models.llama import modeling_llama

from .growing_cache import GrowingLayer, grow_in_place

# The transformers releases that CI runs the suite on (locked) and its fast subset on (oldest and
# newest). Keep in step with setup.cfg and requirements/lock.txt.
TESTED_TRANSFORMERS_MIN = "5.0.0"
TESTED_TRANSFORMERS_MAX = "5.25.0"

TRANSFORMERS_VERSION = Version(transformers.__version__)

apply_rotary_pos_emb = modeling_llama.apply_rotary_pos_emb
"""RoPE of LLaMA: (q [B, H, T, D], k [B, G, T, D], cos, sin) -> rotated (q, k)."""

SUPPORTS_PREFILL_CHUNKING: bool = hasattr(transformers.GenerationConfig(), "prefill_chunk_size") and (
    TRANSFORMERS_VERSION >= Version("5.24.0")
)
"""Whether LiSA models pass `prefill_chunk_size` to `generate` (prefill as chunks over a growing cache).
Only from 5.24, where it was tested: transformers 5.0 refuses it ("Cannot use prefill chunking without
a cache") when generate creates the cache itself. Older releases still chunk long prefills in the
decoder stack (`tuners/lisa/chunked.py`)."""
try:  # where transformers records `output_attentions`: forward hooks that stay installed once added
    from transformers.utils import output_capturing as _output_capturing
except ImportError:  # older 5.x: a wrapper replaces the attention modules' `forward` during the call instead
    _output_capturing = None


def records_attention_weights(config: Any) -> bool:
    """Whether attention modules under `config` return their probabilities, so that `output_attentions=True`
    records them: transformers' eager attention does; sdpa, flash and the other kernels return None."""
    return getattr(config, "_attn_implementation", None) == "eager"


def is_recording_hook(hook: Any) -> bool:
    """Whether a forward hook is transformers' output-capturing hook (`output_attentions` and the like)."""
    return _output_capturing is not None and getattr(hook, "__module__", None) == _output_capturing.__name__


def _forward_captures(module: Any) -> list[tuple[Any, str, int]]:
    """(collected outputs, key, index) of each recording wrapper that older 5.x releases put on `module.forward`
    for the duration of a call (`make_capture_wrapper` in transformers.utils.generic), outermost first."""
    captures = []
    forward = module.__dict__.get("forward")
    while forward is not None:
        code = getattr(forward, "__code__", None)
        names = code.co_freevars if code is not None else ()
        if "collected_outputs" not in names or "orig_forward" not in names:
            break
        cells = {name: cell.cell_contents for name, cell in zip(names, forward.__closure__)}
        captures.append((cells["collected_outputs"], cells["key"], cells["index"]))
        forward = cells["orig_forward"]
    return captures


def forward_records_attentions(module: Any) -> bool:
    """Whether a recording wrapper of an older 5.x release records `module`'s attentions in this call."""
    return any(key == "attentions" for _, key, _ in _forward_captures(module))


def record_attentions(module: Any, output: tuple) -> None:
    """Hand `output` (attention output, probabilities or None) to the recording wrappers that older 5.x releases
    put on `module.forward`, as if `module` had returned it (for a module that stands in for `module` without
    calling it). Releases that record with forward hooks get it from the hooks (`is_recording_hook`)."""
    for collected, key, index in _forward_captures(module):
        if key == "attentions" and output[index] is not None:
            collected[key] = collected.get(key, ()) + (output[index],)


def hook_reads_attentions(hook: Any) -> bool:
    """Whether a forward hook on an attention module may read its probabilities in the current call.

    transformers installs its output-capturing hook on the attention modules at the first
    `output_attentions=True` call and leaves it there; afterwards it records only while a call asks for
    attentions (its collector holds an "attentions" entry). That hook counts as a reader only then; any
    other hook always counts (it may read whatever the module returns).
    """
    if _output_capturing is None or getattr(hook, "__module__", None) != _output_capturing.__name__:
        return True
    collector = getattr(_output_capturing, "_active_collector", None)
    if collector is None:
        return True
    collected = collector.get()
    return isinstance(collected, dict) and "attentions" in collected


__all__ = [
    "CACHE_KWARG",
    "DynamicCache",
    "DynamicLayer",
    "SUPPORTS_PREFILL_CHUNKING",
    "QUANTIZED_CACHE_LAYERS",
    "SUPPORTED_CACHE_LAYERS",
    "WORKING_CACHES",
    "StaticLayer",
    "TESTED_TRANSFORMERS_MAX",
    "TESTED_TRANSFORMERS_MIN",
    "apply_rotary_pos_emb",
    "attn_implementation",
    "cache_kwargs",
    "forward_records_attentions",
    "hook_reads_attentions",
    "is_recording_hook",
    "record_attentions",
    "records_attention_weights",
    "check_transformers_version",
    "model_output",
    "new_cache",
    "is_static_layer",
    "output_cache",
    "peft_adapter_mixin",
    "pop_cache",
    "static_cache_mask",
    "update_cache",
]


def _attention_cache_kwarg() -> str:
    """The keyword under which LLaMA decoder layers pass the KV cache to `self_attn`."""
    params = inspect.signature(modeling_llama.LlamaAttention.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise ImportError(
        f"transformers {transformers.__version__}: LlamaAttention.forward takes neither `cache` nor "
        f"`past_key_values` (parameters: {list(params)}), so LiSA layers cannot find the KV cache. lisa-peft is "
        f"tested with transformers {TESTED_TRANSFORMERS_MIN} to {TESTED_TRANSFORMERS_MAX}: "
        f"pip install 'transformers>={TESTED_TRANSFORMERS_MIN},<={TESTED_TRANSFORMERS_MAX}'."
    )


CACHE_KWARG: str = _attention_cache_kwarg()
"""`"cache"` (transformers >= 5.24) or `"past_key_values"` (older): the cache argument of attention
modules, decoder layers and model forwards."""
_LEGACY_CACHE_KWARG = "past_key_values" if CACHE_KWARG == "cache" else "cache"

SUPPORTED_CACHE_LAYERS: tuple[type, ...] = (DynamicLayer, GrowingLayer, StaticLayer)
"""Cache layer types LiSA and anchor layers write to (exact types: subclasses change the layout).
A `DynamicLayer` becomes a `GrowingLayer` on the first write (`update_cache`). Quantized layers
(`QUANTIZED_CACHE_LAYERS`) are accepted too."""

QUANTIZED_CACHE_LAYERS: tuple[type, ...] = (_QuantizedLayerBase,)
"""Base classes of transformers' quantized cache layers (`cache_implementation="quantized"`): they store
whatever width of keys they are given, so LiSA's r-wide keys are quantized as they are (subclasses accepted)."""

WORKING_CACHES = (
    "cache_implementation 'dynamic' (the default), 'static' (with or without prefill_chunk_size), 'quantized', "
    "'offloaded' or 'offloaded_static' (CUDA), or a DynamicCache / StaticCache / QuantizedCache passed as the cache"
)
"""What LiSA models generate with, for error messages."""


def check_transformers_version(version: Version = TRANSFORMERS_VERSION) -> bool:
    """Warn (and return False) when `version` lies outside the range that CI tested."""
    low, high = Version(TESTED_TRANSFORMERS_MIN), Version(TESTED_TRANSFORMERS_MAX)
    if low <= version and version.release[:2] <= high.release[:2]:
        return True
    warnings.warn(
        f"lisa-peft was tested with transformers {TESTED_TRANSFORMERS_MIN} to {TESTED_TRANSFORMERS_MAX}; "
        f"transformers {version} is installed. LiSA layers replace LLaMA attention and depend on its internals, "
        "so an untested release may break them (transformers 5.24 renamed the cache argument, for instance). "
        f"Install a tested release: pip install 'transformers>={TESTED_TRANSFORMERS_MIN},"
        f"<={TESTED_TRANSFORMERS_MAX}'.",
        UserWarning,
        stacklevel=3,
    )
    return False


def pop_cache(kwargs: dict[str, Any], layer_idx: int | None = None) -> Any:
    """Remove the KV cache from an attention module's keyword arguments and return it (or None).

    Reads the name this transformers passes (`CACHE_KWARG`); a cache under the other name (a caller
    that still uses the old or already the new spelling) is accepted too, never silently dropped.
    With `layer_idx` (a LiSA or anchor layer), `use_cache=True` without a cache raises: continuing
    would silently decode without the cache.
    """
    cache = kwargs.pop(CACHE_KWARG, None)
    legacy = kwargs.pop(_LEGACY_CACHE_KWARG, None)
    cache = cache if cache is not None else legacy
    if cache is None and layer_idx is not None and kwargs.get("use_cache"):
        raise RuntimeError(
            f"Layer {layer_idx} was called with use_cache=True but received no KV cache (looked for "
            f"`{CACHE_KWARG}`): this transformers release ({TRANSFORMERS_VERSION}) passes the cache in a way "
            "lisa-peft does not know, and continuing would silently decode without it. Install a tested "
            f"release: pip install 'transformers>={TESTED_TRANSFORMERS_MIN},<={TESTED_TRANSFORMERS_MAX}'."
        )
    return cache


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """Keyword arguments that pass `cache` to a model's or layer's forward: `{CACHE_KWARG: cache}`."""
    return {CACHE_KWARG: cache}


def output_cache(outputs: Any) -> Any:
    """The KV cache returned by a forward (`outputs.cache` from 5.24, `outputs.past_key_values` before)."""
    for name in (CACHE_KWARG, _LEGACY_CACHE_KWARG):
        value = getattr(outputs, name, None) if not isinstance(outputs, dict) else outputs.get(name)
        if value is not None:
            return value
    return None


def new_cache(model_config: Any) -> DynamicCache:
    """An empty growing cache for a model, as its forward makes one when `use_cache=True` and none is passed."""
    return DynamicCache(config=model_config)


def model_output(output_cls: type, cache: Any, **fields: Any) -> Any:
    """An instance of a model output class (`BaseModelOutputWithPast`, ...) with `fields` and the cache
    under the field name this transformers uses (`cache` from 5.24, `past_key_values` before)."""
    names = {field.name for field in dataclasses.fields(output_cls)}
    name = CACHE_KWARG if CACHE_KWARG in names else _LEGACY_CACHE_KWARG
    return output_cls(**fields, **{name: cache})


def update_cache(cache: Any, keys: torch.Tensor, values: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, ...]:
    """Append keys [B, G, T, r or D] and values [B, G, T, D] to layer `layer_idx` of a transformers cache.

    Returns all cached keys/values of that layer, new ones included: N = the tokens so far for a growing
    layer (`DynamicLayer`, which becomes a `growing_cache.GrowingLayer` here: views of buffers with spare
    room, so an append does not copy the layer) or a quantized one (dequantized), N = `max_cache_len` for a
    pre-allocated one (`StaticLayer`, whose buffers take their last dimension from the first update, so
    LiSA's r-wide keys fit as they are; one allocated ahead at the base head size while still empty is
    allocated again at the width written); positions not yet written are zeros there and the attention mask
    must hide them (`static_cache_mask`). Other caches and layer types (paged, sliding-window) are refused.
    """
    check_cache_layer(cache, layer_idx, keys, values)
    grow_in_place(cache, layer_idx)  # append into spare room, not torch.cat of the whole layer (growing_cache.py)
    return cache.update(keys, values, layer_idx)


def check_cache_layer(cache: Any, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Refuse a cache, or a cache layer, that cannot hold keys [B, G, T, w_k] and values [B, G, T, w_v] of a
    LiSA or anchor layer, naming what works (`WORKING_CACHES`); re-allocate an empty `StaticLayer` whose
    buffers were allocated ahead (`early_initialization`, as transformers' chunked prefill does) at another
    key width than the one written."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        raise ValueError(
            f"LiSA and anchor layers cannot store their keys in a {type(cache).__name__} (layer {layer_idx}): they "
            "cache r-wide low-rank keys, a different shape from the base model's layers, which only caches made "
            f"of per-layer tensors hold. Use {WORKING_CACHES}."
        )
    if layer_idx >= len(layers):  # DynamicCache appends its layers on their first update
        return
    layer = layers[layer_idx]
    if type(layer) is StaticLayer:
        _fit_static_layer(layer, layer_idx, keys, values)
    elif isinstance(layer, QUANTIZED_CACHE_LAYERS):
        _check_quantized_layer(layer, layer_idx, keys, values)
    elif type(layer) not in SUPPORTED_CACHE_LAYERS:
        raise ValueError(
            f"The KV cache of layer {layer_idx} is a {type(layer).__name__}. LiSA and anchor layers support "
            f"DynamicCache (the default), StaticCache (cache_implementation='static') and QuantizedCache "
            f"('quantized') layers only: use {WORKING_CACHES}."
        )


def _fit_static_layer(layer: StaticLayer, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Allocate an empty `StaticLayer` again when its buffers [B, G, max_len, w] were made ahead for another key
    width (transformers' `early_initialization` uses the base head size for every layer)."""
    if not getattr(layer, "is_initialized", False) or layer.keys.shape[-1] == keys.shape[-1]:
        return
    same_rows = layer.keys.shape[:2] == keys.shape[:2] and layer.values.shape[-1] == values.shape[-1]
    if not same_rows or int(layer.get_seq_length()) != 0:
        raise ValueError(
            f"Layer {layer_idx} writes keys of shape {tuple(keys.shape)} into a StaticCache layer that holds keys "
            f"{tuple(layer.keys.shape)} and values {tuple(layer.values.shape)} with {int(layer.get_seq_length())} "
            "positions written: this cache was filled by another model (a LiSA layer caches r-wide keys). Start "
            "a new cache for this model."
        )
    layer.lazy_initialization(keys, values)


def _check_quantized_layer(layer: Any, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Refuse an optimum-quanto layer whose groups do not tile one position of a LiSA layer's low-rank keys.

    optimum-quanto quantizes a [B, G, N, w] tensor along axis 0 (the default) in groups of `q_group_size` over
    the G * N * w entries of a batch row, so only a group size that divides G * w works for every length N.
    The base model's G * D usually is a multiple of the default 64; a LiSA layer's G * r often is not, and
    quantizing its keys would fail on some prompt lengths only, in the middle of generating. Layers that write
    keys as wide as their values (anchor and base layers) are left to transformers, as in the base model.
    """
    if not isinstance(layer, QuantoQuantizedLayer) or layer.axis_key != 0 or keys.shape[-1] == values.shape[-1]:
        return
    group, width = layer.q_group_size, keys.shape[1] * keys.shape[-1]
    if width % group:
        raise ValueError(
            f"The quantized KV cache of LiSA layer {layer_idx} has q_group_size={group}, which does not divide the "
            f"{keys.shape[1]} KV heads x r = {keys.shape[-1]} = {width} low-rank key entries this layer stores per "
            "position, so optimum-quanto would fail on some sequence lengths. Pass a group size that divides "
            f"{width}, e.g. generate(..., cache_implementation='quantized', cache_config={{'backend': 'quanto', "
            f"'q_group_size': {math.gcd(width, group)}}}), or use {WORKING_CACHES}."
        )


def is_static_layer(cache: Any, layer_idx: int) -> bool:
    """True if layer `layer_idx` of `cache` is pre-allocated (`StaticLayer`: keys padded to max_cache_len)."""
    layers = getattr(cache, "layers", None)
    return layers is not None and layer_idx < len(layers) and isinstance(layers[layer_idx], StaticLayer)


def static_cache_mask(cache: Any, layer_idx: int, num_queries: int, num_keys: int,
                      device: torch.device) -> torch.Tensor:
    """Boolean causal mask [1, 1, T, N] (True = attend) for a `StaticLayer` after its update.

    The T new tokens sit at positions L - T .. L - 1 of the N = max_cache_len slots, L being the layer's
    filled length; the slots from L on are not written yet. transformers passes `attention_mask=None`
    when sdpa's own `is_causal` covers those cases, but LiSA's explicit masks need the positions.
    """
    filled = cache.layers[layer_idx].get_seq_length()
    filled = filled.to(device) if isinstance(filled, torch.Tensor) else torch.tensor(filled, device=device)
    query_pos = filled - num_queries + torch.arange(num_queries, device=device)
    return (torch.arange(num_keys, device=device)[None, :] <= query_pos[:, None])[None, None]


def attn_implementation(model: torch.nn.Module) -> str | None:
    """The attention implementation a model's config asks for ("eager", "sdpa", ...)."""
    return getattr(model.config, "_attn_implementation", None)


def peft_adapter_mixin() -> type:
    """transformers' `PeftAdapterMixin`, the class behind `model.load_adapter` / `add_adapter` of every
    transformers model (lisa-peft wraps its `load_adapter` to check LiSA adapters)."""
    from transformers.integrations.peft import PeftAdapterMixin

    return PeftAdapterMixin
