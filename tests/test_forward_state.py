"""LisaForwardState: logits are released as soon as their reader ran (inference), kept when training."""

from __future__ import annotations

import weakref

import torch
from peft import get_peft_model

from lisa_peft import LisaAttention, LisaConfig
from lisa_peft.tuners.lisa.chunked import set_prefill_chunk_size
from lisa_peft.tuners.lisa.state import LisaForwardState, LogitBuffers
from tests.helpers.tiny_models import tiny_llama

LISA_LAYERS = [2, 3, 5]  # anchors 1 and 4; layer 3's and 5's logits have no reader


class _Watch:
    """Records, after every decoder layer, the state's live logits count and which published logits
    tensors are still alive anywhere (weak references). Use as a context manager."""

    def __init__(self, model) -> None:
        self.layers = model.get_base_model().model.layers
        self.live: list[int] = []
        self.refs: dict[int, weakref.ref] = {}
        self.alive_after: dict[int, list[int]] = {}
        self._states: list[LisaForwardState] = []

    def __enter__(self) -> _Watch:
        self._original = original = LisaForwardState.publish

        def publish(state, layer_idx, logits, output):
            self.refs.setdefault(layer_idx, weakref.ref(logits))
            self._states.append(state)
            return original(state, layer_idx, logits, output)

        LisaForwardState.publish = publish
        self._handles = [
            layer.register_forward_hook(lambda module, args, out, idx=idx: self._after(idx))
            for idx, layer in enumerate(self.layers)
        ]
        return self

    def _after(self, idx: int) -> None:
        if self._states:
            self.live.append(self._states[-1].live_logits())
            self.alive_after[idx] = sorted(i for i, ref in self.refs.items() if ref() is not None)

    def __exit__(self, *exc) -> None:
        LisaForwardState.publish = self._original
        for handle in self._handles:
            handle.remove()


def _model():
    model = get_peft_model(tiny_llama(2), LisaConfig(lisa_layers=LISA_LAYERS, init_lisa_weights="random"))
    return model.eval()


def test_inference_holds_one_layer_of_logits_and_frees_them_after_their_reader(input_ids):
    model = _model()
    with _Watch(model) as watch, torch.no_grad():
        released = model(input_ids).logits
    assert sorted(watch.refs) == [1, 2, 3, 4, 5]
    assert max(watch.live) == 1, watch.live
    alive = watch.alive_after
    assert alive[2] == [2]  # anchor 1's logits died once layer 2 had read them
    assert alive[3] == [3]
    assert alive[4] == [4]  # layer 3's unread logits went when the next anchor published
    assert alive[5] == [5]
    with torch.enable_grad():  # a state that keeps everything gives the same result
        kept = model(input_ids).logits
    torch.testing.assert_close(released, kept, atol=0, rtol=0)


def test_training_keeps_the_logits_autograd_needs(input_ids):
    model = _model()
    model.train()
    with _Watch(model) as watch:
        loss = model(input_ids, labels=input_ids).loss
    assert watch.live[-1] == 5  # every wrapped layer's logits, until the forward ends
    loss.backward()
    grad = model.get_base_model().model.layers[2].self_attn.lisa_ffn_down["default"].weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_state_is_made_per_forward_with_the_grad_mode_of_the_call(input_ids):
    model = _model()
    seen: list[bool] = []
    hook = model.get_base_model().model.layers[2].self_attn.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["lisa_state"].release_consumed), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(input_ids)
        with torch.inference_mode():
            model(input_ids)
        model(input_ids)
    finally:
        hook.remove()
    assert seen == [True, True, False]
    assert isinstance(model.get_base_model().model.layers[2].self_attn, LisaAttention)


def test_logit_buffers_alternate_two_storages_and_grow():
    buffers = LogitBuffers()
    shape = (1, 2, 3, 4)
    first, second, third = (buffers.empty(shape, torch.float32, torch.device("cpu")) for _ in range(3))
    assert first.untyped_storage().data_ptr() == third.untyped_storage().data_ptr()
    assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()
    assert third.shape == shape and third.is_contiguous()
    bigger = buffers.empty((1, 2, 3, 8), torch.float32, torch.device("cpu"))  # second's turn, too small
    assert bigger.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()
    assert buffers.allocations == 3
    other_dtype = buffers.empty(shape, torch.float64, torch.device("cpu"))
    assert other_dtype.dtype == torch.float64 and buffers.allocations == 4


def test_only_an_inference_state_reuses_logits_memory():
    cpu = torch.device("cpu")
    kept = LisaForwardState(release_consumed=False)
    storages = {kept.empty_logits((2, 3), torch.float32, cpu).untyped_storage().data_ptr() for _ in range(3)}
    assert len(storages) == 3  # training keeps every layer's logits: never shared
    released = LisaForwardState(release_consumed=True)
    storages = {released.empty_logits((2, 3), torch.float32, cpu).untyped_storage().data_ptr() for _ in range(3)}
    assert len(storages) == 2


def test_a_forward_and_a_chunked_prefill_allocate_two_logits_storages(input_ids, monkeypatch):
    made: list[LogitBuffers] = []
    original_init = LogitBuffers.__init__

    def record(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(LogitBuffers, "__init__", record)
    config = LisaConfig(lisa_layers=LISA_LAYERS, prefill_chunk_size=4)
    model = get_peft_model(tiny_llama(), config).eval()
    with torch.no_grad():
        chunked = model(input_ids).logits
        assert len(made) == 1 and made[0].allocations == 2  # one pool for all chunks, sized for the last
        made.clear()
        set_prefill_chunk_size(model, None)
        whole = model(input_ids).logits
    assert len(made) == 1 and made[0].allocations == 2  # five publishing layers, two storages
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-4)
