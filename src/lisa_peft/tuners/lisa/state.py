"""Per-forward state that carries pre-mask logits from one layer to the next.

A fresh `LisaForwardState` is put into the keyword arguments of the decoder stack's forward by
a pre-hook (`LisaModel`), and transformers passes those keyword arguments on to every
`self_attn`. Logits are stored by layer index, never as "the latest", and a layer writes its
slot only once per forward. This keeps gradient checkpointing correct:

* non-reentrant checkpointing (transformers' default) recomputes a layer with the same keyword
  arguments, so a LiSA layer re-reads the *original* logits tensor of the previous layer and
  autograd flows through it as without checkpointing;
* reentrant checkpointing runs the first forward under `no_grad`, so the stored logits carry no
  graph. On recompute the reading layer turns them into a leaf that requires grad (a
  "bridge"); when the producing layer is recomputed later in the backward pass (always after
  its consumer, reentrant backward runs layer by layer in reverse), it re-injects the
  gradient collected on that leaf into its own graph with `_InjectGrad`. The result is the same
  gradient as without checkpointing (tested).

Inference releases logits early. A state created while grad mode is off (the decoder stack's
forward under `torch.no_grad()` / `torch.inference_mode()`, as in `generate`) hands each layer's
logits to its one reader and forgets them: `consume` removes the entry, and `publish` drops any
older entry that nobody read (the last layer of a LiSA run). At most one layer's logits are then
held by the state, besides the ones the running layer is computing. A state created with grad mode
on keeps every entry until the forward ends: autograd holds them anyway, and both checkpointing
modes re-read them on recompute (reentrant checkpointing runs its first forward under `no_grad`
*inside* a grad-enabled stack forward, so the decision is taken once, when the state is made).

Inference also reuses the logits' memory (`LogitBuffers`, `LisaForwardState.empty_logits`). A layer's
logits are [B, H, T, N]: tens of MB for a prompt of a few thousand tokens, which the C allocator serves
as fresh pages from the kernel every time (glibc uses mmap above its threshold). Since at most two
layers' logits are alive at a time (the one being read and the one being written), two storages handed
out in turn serve a whole forward, and, with `chunked.py` passing one `LogitBuffers` to all its chunks,
a whole chunked prefill: two allocations instead of one per layer and chunk, with the same peak. (On a
2-core CPU the 4k prefill time moved by less than the run-to-run noise: 16.85 s vs 17.02 s.)
"""

from __future__ import annotations

import math

import torch


class _InjectGrad(torch.autograd.Function):
    """y = x in forward; in backward also sends `extra_grad` into `logits`' graph."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, logits: torch.Tensor, extra_grad: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(extra_grad)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (extra_grad,) = ctx.saved_tensors
        return grad_out, extra_grad, None


class LogitBuffers:
    """Two flat storages handed out in turn for inference logits ("ping-pong").

    Tensor k of `empty` shares memory with tensor k + 2 and with no other. That is safe for logits
    because a LiSA layer reads only the previous layer's logits, written by the previous call, while it
    writes its own into the other storage, and nothing reads a layer's logits after the next layer has
    run (the state has released them). `capacity`: minimum elements per storage, so that a growing N
    (the chunks of one prefill) does not reallocate.
    """

    def __init__(self, capacity: int = 0) -> None:
        self.capacity = capacity
        self._storages: list[torch.Tensor | None] = [None, None]
        self._turn = 0
        self.allocations = 0  # storages allocated so far (2 for a whole forward or chunked prefill)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised contiguous tensor of `shape` in the next storage (reallocated when too small)."""
        numel = math.prod(shape)
        turn, self._turn = self._turn, 1 - self._turn
        storage = self._storages[turn]
        if storage is None or storage.numel() < numel or storage.dtype != dtype or storage.device != device:
            storage = torch.empty(max(numel, self.capacity), dtype=dtype, device=device)
            self._storages[turn] = storage
            self.allocations += 1
        return storage[:numel].view(shape)


class LisaForwardState:
    """Logits handed between layers during one forward pass of the decoder stack."""

    def __init__(self, release_consumed: bool | None = None, buffers: LogitBuffers | None = None) -> None:
        """release_consumed: forget logits once read (inference); None = `not torch.is_grad_enabled()`.
        buffers: where `empty_logits` takes inference logits from (a new `LogitBuffers` if None)."""
        self.release_consumed = not torch.is_grad_enabled() if release_consumed is None else release_consumed
        self._buffers = buffers
        self._logits: dict[int, torch.Tensor] = {}
        self._made_with_grad: dict[int, bool] = {}
        self._bridges: dict[int, torch.Tensor] = {}

    def empty_logits(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Memory for a layer's logits [B, H, T, N] that the layer fills completely and then publishes.

        Reused memory (`LogitBuffers`) when the state releases consumed logits (inference); a fresh
        tensor otherwise, since every entry is then kept until the forward ends.
        """
        if self.release_consumed:
            if self._buffers is None:
                self._buffers = LogitBuffers()
            return self._buffers.empty(shape, dtype, device)
        return torch.empty(shape, dtype=dtype, device=device)

    def live_logits(self) -> int:
        """Number of logits tensors the state holds now."""
        return len(self._logits)

    def publish(self, layer_idx: int, logits: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """Store layer `layer_idx`'s pre-mask logits [B, H, T, N]; returns `output` (maybe hooked).

        On the backward-pass recompute of reentrant checkpointing the stored tensor is kept and
        the gradient that the next layer collected for it is routed into `logits`' graph
        through `output` (which must lie on the layer's output path).
        """
        if self.release_consumed:
            self._logits.clear()  # whatever is left was never read: layers run in order
            self._logits[layer_idx] = logits
            return output
        if layer_idx not in self._logits:
            self._logits[layer_idx] = logits
            self._made_with_grad[layer_idx] = torch.is_grad_enabled()
            return output
        bridge = self._bridges.pop(layer_idx, None)
        if bridge is not None and bridge.grad is not None and torch.is_grad_enabled() and logits.requires_grad:
            return _InjectGrad.apply(output, logits, bridge.grad.to(logits.dtype))
        return output

    def consume(self, layer_idx: int) -> torch.Tensor:
        """The pre-mask logits of layer `layer_idx`, for the LiSA layer right after it (forgotten
        after this call when `release_consumed`)."""
        if layer_idx not in self._logits:
            raise RuntimeError(
                f"LiSA needs the attention logits of layer {layer_idx}, but that layer did not produce them in "
                "this forward pass. The decoder layers must run in order within one call of the model; calling "
                "a LiSA layer on its own is not supported."
            )
        if self.release_consumed:
            return self._logits.pop(layer_idx)
        logits = self._logits[layer_idx]
        if torch.is_grad_enabled() and not self._made_with_grad[layer_idx] and not logits.requires_grad:
            # Reentrant-checkpoint recompute: collect the gradient w.r.t. these logits on a leaf.
            bridge = self._bridges.get(layer_idx)
            if bridge is None:
                bridge = logits.detach().requires_grad_(True)
                self._bridges[layer_idx] = bridge
            return bridge
        return logits
