"""Cache layers that append into spare room instead of concatenating: what LiSA and anchor layers store in.

transformers' `DynamicLayer.update` appends with `torch.cat([self.keys, new], dim=-2)`, which copies the
whole layer cache (keys and values) into a freshly allocated tensor at every decode step: O(N) bytes
read and written per token and per layer, on memory the allocator often has to fault in anew; at long
contexts that copy is a large share of a decode step.

`GrowingLayer` keeps the same public state (`keys` / `values` are [B, G, N, *] tensors of the filled
positions, exactly what a `DynamicLayer` would hold) but stores them as views of larger buffers and
writes new positions into the spare room: a copy of the layer happens only when the room runs out,
and the room grows by an eighth of the length (at least `MIN_SPARE_TOKENS`), so a token costs an
amortised 8 positions of copying instead of N.

Decisions:

* Only the layers that LiSA computes (LiSA and anchor layers) are converted, by
  `transformers_compat.update_cache` on their first write; the other layers of the model keep
  transformers' own cache layer, as in the base model.
* The first write (the prompt, or its first prefill chunk) is stored at its exact size: a cache that
  only ever holds a prompt has no spare room, so measured cache sizes (`memory.stored_cache_bytes`,
  which counts buffers, not views) equal transformers'. Spare room exists from the second write on,
  at most max(N/8, `MIN_SPARE_TOKENS`) positions per layer.
* Every `DynamicLayer` method that changes the cache (`crop`, `reorder_cache`, `batch_select_indices`,
  `batch_repeat_interleave`, `offload` / `prefetch`, `reset`) assigns new `keys` / `values` tensors.
  The layer notices on its next write that they are not the views it handed out and copies them into a
  new buffer, so those methods work unchanged (with one copy, as `torch.cat` would have made).
* A view of the filled positions is not contiguous when the batch or head dimension is above 1 (its
  rows are `capacity` apart); the PyTorch path and the Triton kernels take strided keys and values.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

MIN_SPARE_TOKENS = 64
"""Spare positions a layer gets at least when it grows (then an eighth of its length)."""


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose `update` writes into spare room of preallocated buffers (module docstring).

    keys [B, G, N, r or D] and values [B, G, N, D] are views of `_key_buffer` / `_value_buffer`
    [B, G, capacity, *]; `_handed_out` is the (keys, values) pair of the last update (to notice tensors that
a `DynamicLayer` method replaced).
    """

    _key_buffer: torch.Tensor | None = None
    _value_buffer: torch.Tensor | None = None
    _handed_out: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append key_states [B, G, T, *] / value_states [B, G, T, D]; return all keys/values [B, G, N, *]."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held = self.keys.shape[-2] if self.keys.numel() else 0
        total = held + key_states.shape[-2]
        handed = self._handed_out
        in_sync = handed is not None and handed[0] is self.keys and handed[1] is self.values
        if not in_sync or total > self._key_buffer.shape[-2]:
            spare = max(total // 8, MIN_SPARE_TOKENS) if held else 0
            self._key_buffer = _buffer_with(self.keys if held else None, key_states, total + spare)
            self._value_buffer = _buffer_with(self.values if held else None, value_states, total + spare)
        self._key_buffer[..., held:total, :].copy_(key_states)
        self._value_buffer[..., held:total, :].copy_(value_states)
        self.keys = self._key_buffer[..., :total, :]
        self.values = self._value_buffer[..., :total, :]
        self._handed_out = (self.keys, self.values)
        return self.keys, self.values

    def reset(self) -> None:
        """Drop the cache (as `DynamicLayer.reset`) and its buffers."""
        self._key_buffer = self._value_buffer = self._handed_out = None
        super().reset()


def _buffer_with(held: torch.Tensor | None, new: torch.Tensor, capacity: int) -> torch.Tensor:
    """An uninitialised [*new.shape[:-2], capacity, new.shape[-1]] buffer with `held` [.., n, e] copied in front."""
    buffer = new.new_empty((*new.shape[:-2], capacity, new.shape[-1]))
    if held is not None:
        if held.shape[:-2] != new.shape[:-2] or held.shape[-1] != new.shape[-1]:
            raise ValueError(
                f"Cannot append entries of shape {tuple(new.shape)} to a cache layer holding {tuple(held.shape)}: "
                "batch size, heads and head size must match (start a new cache for a new batch)."
            )
        buffer[..., : held.shape[-2], :].copy_(held)
    return buffer


def grow_in_place(cache: Any, layer_idx: int) -> None:
    """Turn layer `layer_idx` of a transformers cache into a `GrowingLayer` if it is a plain `DynamicLayer`
    (the object stays the same, with its contents; other layer types are left alone)."""
    layers = getattr(cache, "layers", None)
    if layers is not None and layer_idx < len(layers) and type(layers[layer_idx]) is DynamicLayer:
        layers[layer_idx].__class__ = GrowingLayer


__all__ = ["GrowingLayer", "MIN_SPARE_TOKENS", "grow_in_place"]
