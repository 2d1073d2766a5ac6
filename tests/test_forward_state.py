"""LisaForwardState: logits are released as soon as their reader ran (inference), kept when training."""

from __future__ import annotations

import weakref

import torch
from peft import get_peft_model

from lisa_peft import LisaAttention, LisaConfig
from lisa_peft.tuners.lisa.state import LisaForwardState
from tests.conftest import tiny_llama

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
