"""Chunked prefill (LisaConfig.prefill_chunk_size): the results of one pass, in chunks of query rows."""

from __future__ import annotations

import os

import pytest
import torch
from peft import get_peft_model

import lisa_kernels
from lisa_peft import LisaConfig
from lisa_peft.tuners.lisa.chunked import set_prefill_chunk_size
from lisa_peft.tuners.lisa.model import set_kernel_mode
from lisa_peft.tuners.lisa.transformers_compat import cache_kwargs, output_cache
from tests.helpers.tiny_models import VOCAB, tiny_llama

CHUNK = 5
TOL = dict(atol=1e-5, rtol=1e-4)


def _model(kv_heads: int, share: str = "logits", chunk: int | None = CHUNK):
    config = LisaConfig(lisa_layers=[2, 3, 5], share=share, prefill_chunk_size=chunk)
    return get_peft_model(tiny_llama(kv_heads), config).eval()


def _ids(batch: int = 2, length: int = 23) -> torch.Tensor:  # 23 = 4 chunks of 5 + 3
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(2))


class _Calls:
    """Counts the passes through the decoder stack (one per chunk) at its first layer."""

    def __init__(self, model) -> None:
        self.count = 0
        self._handle = model.get_base_model().model.layers[0].register_forward_pre_hook(self._seen)

    def _seen(self, module, args) -> None:
        self.count += 1

    def __enter__(self) -> _Calls:
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def _unchunked(model, **kwargs):
    set_prefill_chunk_size(model, None)
    try:
        with _Calls(model) as calls, torch.no_grad():
            output = model(**kwargs)
        assert calls.count == 1
        return output
    finally:
        set_prefill_chunk_size(model, CHUNK)


@pytest.mark.parametrize("share", ["logits", "probs"])
def test_chunked_forward_equals_one_pass(kv_heads, share):
    model, ids = _model(kv_heads, share), _ids()
    with _Calls(model) as calls, torch.no_grad():
        chunked = model(input_ids=ids)
    assert calls.count == 5
    reference = _unchunked(model, input_ids=ids)
    torch.testing.assert_close(chunked.logits, reference.logits, **TOL)
    cache, full_cache = output_cache(chunked), output_cache(reference)
    for layer, full_layer in zip(cache.layers, full_cache.layers):
        torch.testing.assert_close(layer.keys, full_layer.keys, **TOL)
        torch.testing.assert_close(layer.values, full_layer.values, **TOL)


def test_chunked_forward_with_labels_and_no_cache(kv_heads):
    model, ids = _model(kv_heads), _ids()
    with _Calls(model) as calls, torch.no_grad():
        chunked = model(input_ids=ids, labels=ids, use_cache=False)
    assert calls.count == 5
    assert output_cache(chunked) is None
    reference = _unchunked(model, input_ids=ids, labels=ids, use_cache=False)
    torch.testing.assert_close(chunked.loss, reference.loss, **TOL)
    torch.testing.assert_close(chunked.logits, reference.logits, **TOL)


def test_chunked_forward_continues_a_cache_and_keeps_the_last_logits(kv_heads):
    model, ids = _model(kv_heads), _ids(length=30)
    with torch.no_grad():
        prefix = model(input_ids=ids[:, :7], use_cache=True)
        tail = model(input_ids=ids[:, 7:], **cache_kwargs(output_cache(prefix)), logits_to_keep=3)
        full = _unchunked(model, input_ids=ids)
    assert tail.logits.shape == (2, 3, VOCAB)
    torch.testing.assert_close(tail.logits, full.logits[:, -3:], **TOL)
    assert output_cache(tail).get_seq_length() == 30


def test_chunked_forward_with_left_padding(kv_heads):
    model = _model(kv_heads)
    ids = _ids(length=21)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # sequence 1 is left-padded by 6 (more than one chunk)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with _Calls(model) as calls, torch.no_grad():
        chunked = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert calls.count == 5
    reference = _unchunked(model, input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    torch.testing.assert_close(chunked[real], reference[real], **TOL)
    alone = _unchunked(model, input_ids=ids[1:, 6:]).logits  # and the padded row equals the row alone
    torch.testing.assert_close(chunked[1, 6:], alone[0], **TOL)


@pytest.mark.parametrize("padded", [False, True], ids=["plain", "left-padded"])
def test_generate_prefills_in_chunks_with_identical_greedy_tokens(kv_heads, padded):
    model, ids = _model(kv_heads), _ids(length=17)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :4] = 0
    with _Calls(model) as calls, torch.no_grad():
        chunked = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert calls.count == 4 + 7  # 17 prompt tokens in chunks of 5, then 7 decode steps
    set_prefill_chunk_size(model, None)
    with _Calls(model) as calls, torch.no_grad():
        one_pass = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert calls.count == 1 + 7
    assert torch.equal(chunked, one_pass)


def test_generate_leaves_a_users_chunk_size_and_use_cache_false_alone(input_ids):
    model = _model(2)
    with _Calls(model) as calls, torch.no_grad():
        model.generate(input_ids, max_new_tokens=2, do_sample=False, prefill_chunk_size=4)
    assert calls.count == 3 + 1  # 12 tokens in chunks of 4
    with _Calls(model) as calls, torch.no_grad():  # transformers' chunking off: the stack chunks by itself
        model.generate(input_ids, max_new_tokens=2, do_sample=False, prefill_chunk_size=None)
    assert calls.count == 3 + 1  # 12 tokens in chunks of 5
    with _Calls(model) as calls, torch.no_grad():  # no cache: transformers refuses its chunking, so it is not
        model.generate(input_ids, max_new_tokens=2, do_sample=False, use_cache=False)  # set; the stack chunks
    assert calls.count == 3 + 3  # 12, then 13 tokens recomputed, each in chunks of 5 over a temporary cache


def test_no_chunking_with_grad_or_disabled_adapters(input_ids):
    base = tiny_llama(2)
    with torch.no_grad():
        reference = base(_ids()).logits
    model = get_peft_model(base, LisaConfig(lisa_layers=[2, 3, 5], prefill_chunk_size=CHUNK))
    with _Calls(model) as calls:
        model(input_ids=_ids())  # grad mode on: one pass
        with model.disable_adapter(), torch.no_grad():
            base_logits = model(input_ids=_ids()).logits
    assert calls.count == 2
    assert torch.equal(base_logits, reference)


@pytest.mark.parametrize("bad", [-1, 2.5, True, "512"])
def test_prefill_chunk_size_is_validated(bad):
    with pytest.raises(ValueError, match="prefill_chunk_size"):
        LisaConfig(lisa_layers=[2], prefill_chunk_size=bad)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton kernels on CPU need TRITON_INTERPRET=1")
def test_chunks_on_the_triton_kernels_equal_the_pytorch_path(monkeypatch):
    """Each chunk's queries are the last rows of a longer key set: the prefill kernels' causal offset."""
    kernel_calls = {"lisa_prefill": 0, "anchor_attention": 0}
    for name in kernel_calls:
        original = getattr(lisa_kernels, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            kernel_calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(lisa_kernels, name, counted)
    ids = _ids(batch=1, length=12)
    model = get_peft_model(tiny_llama(2), LisaConfig(lisa_layers=[2, 3, 5], kernel="triton", prefill_chunk_size=5))
    with torch.no_grad():
        on_kernels = model.eval()(input_ids=ids).logits
    assert kernel_calls["lisa_prefill"] == 3 * 3 and kernel_calls["anchor_attention"] == 2 * 3
    set_kernel_mode(model, "torch")
    torch.testing.assert_close(on_kernels, _unchunked(model, input_ids=ids).logits, **TOL)


def test_unload_removes_the_chunking_forward():
    base = tiny_llama(2)
    model = get_peft_model(base, LisaConfig(lisa_layers=[2, 3]))
    assert "forward" in base.model.__dict__
    restored = model.unload()
    assert "forward" not in restored.model.__dict__ and not restored.model._forward_pre_hooks
