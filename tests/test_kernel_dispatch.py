"""LisaConfig.kernel dispatch: the Triton kernels (interpreted on CPU) give the PyTorch path's results,
and the PyTorch path runs where the kernels must not (auto on CPU, training, masks they cannot express)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from peft import get_peft_model

import lisa_kernels
from lisa_peft import LisaConfig
from lisa_peft.tuners.lisa.dispatch import KernelPlan, mask_plan
from lisa_peft.tuners.lisa.model import set_kernel_mode
from lisa_peft.tuners.lisa.transformers_compat import cache_kwargs, output_cache
from tests.helpers.tiny_models import tiny_llama

KERNELS = ("anchor_attention", "lisa_decode", "lisa_prefill")
TOL = dict(atol=1e-5, rtol=1e-4)  # as tests/test_cache.py: summation order only (all fp32)
interpreter_only = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs the kernels on CPU tensors under TRITON_INTERPRET=1"
)


@pytest.fixture
def kernel_calls(monkeypatch) -> dict[str, int]:
    """Counts the calls of each Triton kernel entry point (dispatch.py looks them up on lisa_kernels)."""
    calls = dict.fromkeys(KERNELS, 0)
    for name in KERNELS:
        original = getattr(lisa_kernels, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(lisa_kernels, name, counted)
    return calls


@pytest.fixture
def no_kernels(monkeypatch) -> None:
    """Any call of a Triton kernel fails the test."""
    for name in KERNELS:
        def refuse(*args, _name=name, **kwargs):
            raise AssertionError(f"{_name} was called, the PyTorch path was expected")

        monkeypatch.setattr(lisa_kernels, name, refuse)


def _model(kv_heads: int, lisa_layers=(2, 3, 5), kernel: str = "triton", **kwargs):
    config = LisaConfig(lisa_layers=list(lisa_layers), kernel=kernel)
    return get_peft_model(tiny_llama(kv_heads, **kwargs), config).eval()


def _ids(batch: int, length: int) -> torch.Tensor:
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(1))


@interpreter_only
@pytest.mark.parametrize("kv_heads,share", [(4, "logits"), (2, "probs")], ids=["mha-logits", "gqa-probs"])
def test_full_forward_matches_torch_path(kv_heads, share, kernel_calls):
    model = get_peft_model(tiny_llama(kv_heads), LisaConfig(lisa_layers=[2, 3, 5], share=share, kernel="torch"))
    model.eval()
    ids = _ids(2, 10)
    with torch.no_grad():
        expected = model(ids).logits
        set_kernel_mode(model, "triton")
        actual = model(ids).logits
    assert kernel_calls == {"anchor_attention": 2, "lisa_decode": 0, "lisa_prefill": 3}
    torch.testing.assert_close(actual, expected, **TOL)


@interpreter_only
@pytest.mark.parametrize("attn", ["sdpa", "eager"])  # sdpa hands on mask None, eager a float causal mask
def test_decode_steps_match_torch_path(attn, kernel_calls):
    model = _model(2, lisa_layers=(3, 4), attn_implementation=attn)
    ids = _ids(2, 8)
    logits = {}
    with torch.no_grad():
        for mode in ("torch", "triton"):
            set_kernel_mode(model, mode)
            out = model(ids[:, :6], use_cache=True)
            steps, cache = [out.logits], output_cache(out)
            for t in range(6, 8):
                out = model(ids[:, t : t + 1], **cache_kwargs(cache), use_cache=True)
                steps.append(out.logits)
            logits[mode] = torch.cat(steps, dim=1)
    assert kernel_calls == {"anchor_attention": 3, "lisa_decode": 4, "lisa_prefill": 2}
    torch.testing.assert_close(logits["triton"], logits["torch"], **TOL)


@interpreter_only
def test_greedy_generation_gives_the_same_tokens(kv_heads, kernel_calls):
    model = _model(kv_heads, lisa_layers=(3, 4))
    ids = _ids(1, 6)
    with torch.no_grad():
        set_kernel_mode(model, "torch")
        expected = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True)
        set_kernel_mode(model, "triton")
        actual = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True)
    assert kernel_calls["lisa_prefill"] == 2 and kernel_calls["lisa_decode"] == 2 * 3
    assert torch.equal(actual, expected)


@interpreter_only
def test_ragged_decode_mask_runs_on_kernels_with_lengths(kernel_calls):
    # A 4D decode mask that allows a prefix of the keys per sequence -> the kernels' `lengths`.
    model = _model(2, lisa_layers=(3, 4))
    ids = _ids(2, 7)
    mask = torch.zeros(2, 1, 1, 7, dtype=torch.bool)
    mask[0, ..., :7] = True
    mask[1, ..., :4] = True
    assert torch.equal(mask_plan(mask, 1, 7).lengths, torch.tensor([7, 4], dtype=torch.int32))
    logits = {}
    with torch.no_grad():
        for mode in ("torch", "triton"):
            set_kernel_mode(model, mode)
            cache = output_cache(model(ids[:, :6], use_cache=True))
            logits[mode] = model(ids[:, 6:], **cache_kwargs(cache), attention_mask=mask, use_cache=True).logits
    assert kernel_calls["lisa_decode"] == 2
    torch.testing.assert_close(logits["triton"], logits["torch"], **TOL)


@interpreter_only
def test_inference_mode_with_eager_mask(kernel_calls):
    # inference tensors (no version counter) as masks; the decision is remembered per forward only
    model = _model(2, lisa_layers=(3, 4), attn_implementation="eager")
    ids = _ids(1, 6)
    with torch.inference_mode():
        expected = model(ids).logits
        set_kernel_mode(model, "torch")
        torch.testing.assert_close(model(ids).logits, expected, **TOL)
    assert kernel_calls["lisa_prefill"] == 2


def test_left_padding_falls_back_to_torch_path(no_kernels):
    model = _model(2, lisa_layers=(3, 4))
    batch = torch.tensor([[11, 12, 13, 14, 15], [0, 0, 21, 22, 23]])
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    with torch.no_grad():
        out = model.generate(batch, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 8)


def test_mask_plans():
    causal = torch.ones(4, 6, dtype=torch.bool).tril(diagonal=2)[None, None]  # T=4 queries at the last 4 of 6 keys
    assert mask_plan(None, 4, 6) == KernelPlan()
    assert mask_plan(causal, 4, 6) == KernelPlan()
    additive = torch.zeros(causal.shape).masked_fill(~causal, torch.finfo(torch.float32).min)
    assert mask_plan(additive, 4, 6) == KernelPlan()
    assert mask_plan(additive.masked_fill(causal, -1.0), 4, 6) is None  # a finite bias
    padded = causal.repeat(2, 1, 1, 1)
    padded[1, ..., :1] = False  # left padding
    assert mask_plan(padded, 4, 6) is None
    assert mask_plan(torch.ones(2, 1, 1, 6, dtype=torch.bool), 1, 6) == KernelPlan()
    assert mask_plan(padded[:, :, -1:], 1, 6) is None  # left padding at decode
    assert mask_plan(torch.ones(2, 6), 1, 6) is None  # 2D (flash-attention) mask: the torch path explains


def test_auto_on_cpu_uses_torch_path(no_kernels, input_ids):
    model = _model(2, kernel="auto")
    with torch.no_grad():
        out = model(input_ids).logits
        set_kernel_mode(model, "torch")
        torch.testing.assert_close(model(input_ids).logits, out, rtol=0, atol=0)


def test_training_uses_torch_path(monkeypatch, input_ids):
    # LiSA layers need gradients for their weights: PyTorch path. (An anchor layer whose inputs need no
    # gradient -- frozen base, no checkpointing -- may still use the anchor kernel: nothing flows back through it.)
    grads = {}
    for mode in ("torch", "triton"):
        model = _model(2, kernel=mode)
        model.train()
        if mode == "triton":
            for name in ("lisa_decode", "lisa_prefill"):
                monkeypatch.setattr(lisa_kernels, name, lambda *a, **k: pytest.fail("LiSA kernel used in training"))
        model(input_ids, labels=input_ids).loss.backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads["torch"] and all(g is not None for g in grads["triton"].values())
    for name, grad in grads["torch"].items():
        torch.testing.assert_close(grads["triton"][name], grad, **TOL)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_triton_mode_without_interpreter_or_gpu_raises():
    code = """
import torch, transformers
from peft import get_peft_model
import lisa_peft
config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                  num_key_value_heads=2, vocab_size=32)
model = get_peft_model(transformers.LlamaForCausalLM(config), lisa_peft.LisaConfig(lisa_layers=[2], kernel="triton"))
try:
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
except RuntimeError as error:
    print(error)
"""
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "need a CUDA GPU" in result.stdout and "TRITON_INTERPRET=1" in result.stdout
    assert "kernel='torch'" in result.stdout
