"""Chunked prefill: the decoder stack runs a long input as query chunks over a growing KV cache.

Row i of a LiSA layer's logits depends only on row i of the previous layer's logits and on this
layer's keys (docs/method.md, "Cost of the logits chain"), and the KV cache carries the keys of earlier rows.
So a long input can run as chunks of `prefill_chunk_size` query rows, each attending to the cache
built by the chunks before it, with the results of one pass: logit memory falls from O(B·H·T²) per
layer to O(B·H·chunk·T), and only the causal part of the score matrices is computed.

Design (ours): the chunking sits at the decoder stack (`LlamaModel`), whose `forward` is replaced on
the instance by `chunked_stack_forward` while a LiSA adapter is injected (removed by `unload`). The
causal-LM head above it is untouched, so `labels`, `logits_to_keep` and the loss work as in one
pass, and every entry point goes through it: `PeftModel.__call__`, `generate` and the evaluation
code. The stack chunks only when

* grad mode is off (inference; training always runs in one pass: autograd keeps every chunk's
  activations anyway, and gradient checkpointing re-runs layers of one pass),
* a LiSA layer of the active adapter is active (disabled adapters give the exact base model),
* the input is longer than the chunk, and
* the call is one this module can slice: inputs, a 2D attention mask over cached plus new
  positions, position ids, a `DynamicCache` or none (`use_cache=False`: a temporary cache is
  built and dropped), no `output_attentions` / `output_hidden_states` (their per-layer tensors
  would have to be assembled across chunks) and no other non-None argument.

Anything else runs in one pass, as before.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import transformers_compat as compat
from .state import LisaForwardState, LogitBuffers

# Stack-forward arguments that chunking slices or passes on; a call with any other non-None one runs in one pass.
_HANDLED = {"input_ids", "inputs_embeds", "attention_mask", "position_ids", "use_cache", "lisa_state",
            "output_attentions", "output_hidden_states", "return_dict", compat.CACHE_KWARG}


def active_chunk_size(stack: nn.Module) -> int | None:
    """`prefill_chunk_size` of the adapter whose LiSA layers are active in `stack`, else None."""
    from .layer import LisaAttention

    for layer in stack.layers:
        attn = getattr(layer, "self_attn", None)
        if isinstance(attn, LisaAttention):
            adapter, role = attn._active_role()
            if role is not None:
                return attn.lisa_prefill_chunk.get(adapter) or None
    return None


def _new_rows(kwargs: dict[str, Any]) -> int:
    """T of the new positions: input_ids [B, T] or inputs_embeds [B, T, d]; 0 when neither is given."""
    for name in ("input_ids", "inputs_embeds"):
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor):
            return value.shape[1]
    return 0


def _can_chunk(kwargs: dict[str, Any], chunk_size: int) -> bool:
    """Whether a stack forward with these keyword arguments may run as chunks (see module docstring)."""
    if any(value is not None for name, value in kwargs.items() if name not in _HANDLED):
        return False
    if kwargs.get("output_attentions") or kwargs.get("output_hidden_states") or kwargs.get("return_dict") is False:
        return False
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        return False  # custom 4D masks are not sliced here
    cache = kwargs.get(compat.CACHE_KWARG)
    return cache is None or isinstance(cache, compat.DynamicCache)


def chunked_stack_forward(stack: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The decoder stack's forward, as query chunks when that applies (module docstring), else one pass.

    Chunks get input rows [B, start:end] (input_ids [B, T] / inputs_embeds [B, T, d], position_ids
    [B, T]), the 2D attention mask over the P cached and the first `end` new positions [B, P + end],
    the growing cache and a fresh `LisaForwardState` each. Returns the stack's output with the
    chunks' last hidden states [B, T, d] concatenated and the cache (None when `use_cache=False`).
    """
    forward = type(stack).forward
    if args or torch.is_grad_enabled() or _new_rows(kwargs) <= 1:
        return forward(stack, *args, **kwargs)
    size = active_chunk_size(stack)
    total = _new_rows(kwargs)
    if not size or total <= size or not _can_chunk(kwargs, size):
        return forward(stack, *args, **kwargs)
    kwargs.pop("lisa_state", None)
    use_cache = kwargs.pop("use_cache", None)
    use_cache = stack.config.use_cache if use_cache is None else use_cache
    cache = kwargs.pop(compat.CACHE_KWARG, None)
    cache = compat.new_cache(stack.config) if cache is None else cache
    past = cache.get_seq_length()
    mask = kwargs.pop("attention_mask", None)
    positions = kwargs.pop("position_ids", None)
    name = "input_ids" if kwargs.get("input_ids") is not None else "inputs_embeds"
    inputs = kwargs.pop(name)
    kwargs.pop("input_ids" if name == "inputs_embeds" else "inputs_embeds", None)
    hidden, output = [], None
    # One pair of logits storages for all chunks, sized for the last one (state.LogitBuffers).
    capacity = inputs.shape[0] * stack.config.num_attention_heads * min(size, total) * (past + total)
    buffers = LogitBuffers(capacity=capacity)
    for start in range(0, total, size):
        end = min(start + size, total)
        chunk = {name: inputs[:, start:end], "attention_mask": None if mask is None else mask[:, : past + end]}
        if positions is not None:
            chunk["position_ids"] = positions[..., start:end]
        output = forward(stack, **chunk, **compat.cache_kwargs(cache), use_cache=True,
                         lisa_state=LisaForwardState(buffers=buffers), **kwargs)
        hidden.append(output.last_hidden_state)
    return compat.model_output(type(output), cache if use_cache else None, last_hidden_state=torch.cat(hidden, dim=1))


def set_prefill_chunk_size(model: nn.Module, size: int | None, adapter_name: str | None = None) -> None:
    """Change `LisaConfig.prefill_chunk_size` of a loaded LiSA model (its active adapter unless `adapter_name`)."""
    from .layer import set_adapter_setting

    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise ValueError(f"`prefill_chunk_size` must be None, 0 or a positive integer, got {size!r}.")
    set_adapter_setting(model, adapter_name, "prefill_chunk_size", "lisa_prefill_chunk", size)
