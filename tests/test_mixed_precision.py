"""Mixed-precision training: autocast (bf16/fp16), half-precision bases and LiSA weights (issue 26).

Under autocast, LiSA's custom autograd Functions (`functional._HeadFFNRecompute`,
`functional._SoftmaxValuesRecompute`) receive inputs of mixed dtypes (e.g. bfloat16 logits and float32
FFN weights). Autocast covers their forward but not their backward, which used to crash
("mat1 and mat2 must have the same dtype"). These tests train through every combination and compare
the LiSA gradients with a float32 run.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from unittest import mock

import pytest
import torch
import transformers
from peft import get_peft_model

from lisa_peft import LisaConfig
from lisa_peft.tuners.lisa import functional as LF
from tests.helpers.tiny_models import VOCAB, tiny_llama

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
BASE = {"fp32-base": torch.float32, "bf16-base": torch.bfloat16}
LISA = {"lisa-default": None, "lisa-bf16": "bfloat16"}  # default: PEFT's rule, float32 LiSA weights
CHECKPOINTING = {"no-ckpt": None, "ckpt-nonreentrant": False, "ckpt-reentrant": True}
LISA_LAYERS = [3, 4, 5]

# Agreement with float32 of the gradients of all LiSA weights. Measured on this setup (all 16 dtype/share
# combinations; checkpointing gives the same numbers): global cosine >= 0.9990, global relative error <= 0.045,
# per weight tensor cosine >= 0.96 and norm error <= 0.25 (both on the first LiSA layer's FFN biases). The limits
# leave room for other CPUs' rounding; a real bug breaks them: a gradient that is zero, has the wrong sign or
# misses a term (the ReLU mask, the softmax row term, the gradient to x) breaks a cosine, a gradient off by a
# factor of 2 breaks the norm error (each checked by mutating functional.py). The float32 reference runs plain
# autograd (`_plain_autograd`), so a bug in the recompute Functions' backward does not cancel out. A wrong
# gradient of V reaches LiSA weights only through the frozen base, too weakly for these limits: the comparison
# with autograd (`test_recompute_functions_match_autograd_under_autocast`) catches it.
GLOBAL_COSINE = 0.99  # cosine between all LiSA gradients concatenated, mixed vs float32
GLOBAL_RELATIVE_ERROR = 0.15  # ||g - g32|| / ||g32|| over all LiSA gradients concatenated
WEIGHT_COSINE = 0.8  # cosine per LiSA weight tensor
WEIGHT_NORM_ERROR = 0.4  # | ||g|| / ||g32|| - 1 | per LiSA weight tensor


def _model(base_dtype: torch.dtype, lisa_dtype: str | None, share: str) -> torch.nn.Module:
    """A tiny LiSA model whose gradients are well conditioned, so that half precision can resolve them.

    Base init std 0.1 instead of 0.02: the default gives near-uniform attention (logits ~1e-2), and
    every FFN gradient is then a difference of nearly equal terms. The identity FFN is perturbed
    (noise std 0.1) to be non-trivial; with share="probs" its output is shifted by +0.5: the layer
    takes log(relu(A) + 1e-6), whose gradient 1/A is decided by rounding where A is near 0.
    """
    base = tiny_llama(2, initializer_range=0.1).to(base_dtype)
    model = get_peft_model(base, LisaConfig(lisa_layers=LISA_LAYERS, share=share, lisa_dtype=lisa_dtype))
    model.train()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lisa_ffn" in name:
                param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.1)
                if share == "probs" and "lisa_ffn_down" in name and name.endswith("bias"):
                    param.add_(0.5)
    return model


def _input_ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def _lisa_grads(model: torch.nn.Module, autocast: torch.dtype | None) -> dict[str, torch.Tensor]:
    """One forward (under CPU autocast to `autocast` unless None) and backward -> LiSA gradients."""
    model.zero_grad(set_to_none=True)
    ids = _input_ids()
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


_CACHE: dict[tuple, tuple[torch.nn.Module, dict[str, torch.Tensor]]] = {}


def _autograd_reference_ffn(x, w1, b1, w2, b2):  # noqa: ANN001, ANN202
    return LF._head_ffn_forward(x, w1, b1, w2, b2)  # plain autograd over the same ops (autocast covers it)


def _autograd_reference_softmax_values(logits, mask, v):  # noqa: ANN001, ANN202
    return LF.grouped_values(LF.masked_softmax(logits, mask, v.dtype), v)


@contextlib.contextmanager
def _plain_autograd() -> Iterator[None]:
    """The two recompute Functions replaced by plain autograd over the same ops: a reference that does not
    share their backward code."""
    with mock.patch.object(LF._HeadFFNRecompute, "apply", _autograd_reference_ffn), \
            mock.patch.object(LF._SoftmaxValuesRecompute, "apply", _autograd_reference_softmax_values):
        yield


def _model_and_float32_grads(base: str, lisa: str, share: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The model (copy it before use) and the float32 gradients of the same weights (no autocast, plain
    autograd: `_plain_autograd`)."""
    key = (base, lisa, share)
    if key not in _CACHE:
        model = _model(BASE[base], LISA[lisa], share)
        with _plain_autograd():
            _CACHE[key] = model, _lisa_grads(copy.deepcopy(model).float(), None)
    return _CACHE[key]


def _exactly_zero(name: str, share: str) -> bool:
    """The last LiSA layer's FFN output bias with share="logits" adds one constant per head to every logit of
    a row: softmax ignores it and no later layer reads those logits, so its exact gradient is zero."""
    return share == "logits" and f"layers.{LISA_LAYERS[-1]}.self_attn.lisa_ffn_down" in name and "bias" in name


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def test_issue_reproducer_trains_under_bf16_autocast():
    """The reproducer of issue 26 (default LisaConfig, fp32 base, CPU bf16 autocast) crashed in the backward."""
    torch.manual_seed(0)
    model = get_peft_model(
        transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128)),
        LisaConfig(lisa_layers=[3, 4, 5]),
    )
    model.train()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert torch.isfinite(loss) and grads and all("lisa_" in n for n in grads)
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads.values())


@pytest.mark.parametrize("checkpointing", list(CHECKPOINTING))
@pytest.mark.parametrize("share", ["logits", "probs"])
@pytest.mark.parametrize("autocast", list(AUTOCAST))
@pytest.mark.parametrize("lisa", list(LISA))
@pytest.mark.parametrize("base", list(BASE))
def test_lisa_gradients_under_autocast_agree_with_float32(base, lisa, autocast, share, checkpointing):
    template, reference = _model_and_float32_grads(base, lisa, share)
    model = copy.deepcopy(template)
    if CHECKPOINTING[checkpointing] is not None:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": CHECKPOINTING[checkpointing]}
        )
        model.enable_input_require_grads()
    grads = _lisa_grads(model, AUTOCAST[autocast])
    params = dict(model.named_parameters())
    assert grads.keys() == reference.keys() and all("lisa_" in name for name in grads)
    for name, grad in grads.items():
        assert grad is not None and grad.dtype == params[name].dtype, name
        assert bool(torch.isfinite(grad).all()), name

    compared = [name for name in reference if not _exactly_zero(name, share)]
    mixed = torch.cat([grads[n].float().flatten() for n in compared])
    exact = torch.cat([reference[n].float().flatten() for n in compared])
    cosine = _cosine(mixed, exact)
    relative_error = ((mixed - exact).norm() / exact.norm()).item()
    assert cosine >= GLOBAL_COSINE, (cosine, relative_error)
    assert relative_error <= GLOBAL_RELATIVE_ERROR, (cosine, relative_error)
    for name in compared:
        grad, exact_grad = grads[name].float(), reference[name].float()
        assert _cosine(grad, exact_grad) >= WEIGHT_COSINE, (name, _cosine(grad, exact_grad))
        norm_error = abs(grad.norm().item() / exact_grad.norm().item() - 1)
        assert norm_error <= WEIGHT_NORM_ERROR, (name, norm_error)
    for name in set(reference) - set(compared):  # zero in exact arithmetic: only rounding noise is allowed
        assert reference[name].norm() <= 1e-6 * exact.norm(), name
        assert grads[name].float().norm() <= 1e-3 * exact.norm(), name


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("share", ["logits", "probs"])
def test_checkpointing_under_autocast_gives_the_same_gradients(share, use_reentrant):
    """The recompute of both checkpointing modes runs in the forward's autocast dtypes: the same gradients."""
    template, _ = _model_and_float32_grads("fp32-base", "lisa-default", share)
    plain = _lisa_grads(copy.deepcopy(template), torch.bfloat16)
    model = copy.deepcopy(template)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.enable_input_require_grads()
    checkpointed = _lisa_grads(model, torch.bfloat16)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-4, msg=name)


def _devices() -> list:
    cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    return ["cpu", pytest.param("cuda", marks=cuda)]


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("autocast", list(AUTOCAST))
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                                             (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
def test_recompute_functions_match_autograd_under_autocast(device, autocast, x_dtype, w_dtype):
    """Both recompute Functions give autograd's own result under autocast (on `device`'s autocast): the same
    output, the gradients of plain autograd over the same ops, each gradient in its input's dtype."""
    generator = torch.Generator().manual_seed(0)

    def leaf(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale).to(device, dtype).requires_grad_(True)

    b, h, g, t, n, f, d = 2, 4, 2, 5, 7, 8, 16
    ffn_inputs = (leaf(b, h, t, n, dtype=x_dtype), leaf(f, h, dtype=w_dtype, scale=0.5), leaf(f, dtype=w_dtype),
                  leaf(h, f, dtype=w_dtype, scale=0.5), leaf(h, dtype=w_dtype))
    mask = LF.additive_mask(None, t, n, x_dtype, torch.device(device))
    sv_inputs = (leaf(b, h, t, n, dtype=x_dtype), leaf(b, g, n, d, dtype=x_dtype))
    cases = [
        (LF.head_ffn, _autograd_reference_ffn, ffn_inputs),
        (lambda lg, v: LF.softmax_values(lg, mask, v), lambda lg, v: _autograd_reference_softmax_values(lg, mask, v),
         sv_inputs),
    ]
    def tolerance(*dtypes: torch.dtype) -> dict[str, float]:  # a few units in the last place of the coarsest dtype
        return {"atol": 1e-2, "rtol": 2e-2} if torch.bfloat16 in dtypes else {"atol": 1e-3, "rtol": 2e-3}

    for function, reference, inputs in cases:
        results = []
        for fn in (function, reference):
            for tensor in inputs:
                tensor.grad = None
            with torch.autocast(device, dtype=AUTOCAST[autocast]):
                out = fn(*inputs)
            grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(device, out.dtype)
            out.backward(grad_out)
            results.append((out.detach(), [tensor.grad.clone() for tensor in inputs]))
        (out, grads), (ref_out, ref_grads) = results
        assert out.dtype == ref_out.dtype == AUTOCAST[autocast]
        torch.testing.assert_close(out, ref_out, **tolerance(out.dtype))
        for tensor, grad, ref_grad in zip(inputs, grads, ref_grads, strict=True):
            assert grad.dtype == tensor.dtype
            scale = ref_grad.float().abs().max().item() or 1.0  # gradients of different sizes: relative to each
            torch.testing.assert_close(grad.float() / scale, ref_grad.float() / scale,
                                       **tolerance(grad.dtype, out.dtype))


def test_trainer_bf16_trains_only_lisa_weights(tmp_path):
    """`Trainer(bf16=True)` (CPU autocast on CPU) for a few steps: finite losses, only LiSA weights change."""
    model = get_peft_model(tiny_llama(2), LisaConfig(lisa_layers=LISA_LAYERS))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    autocast_seen = []
    lisa_attention = model.base_model.model.model.layers[LISA_LAYERS[0]].self_attn
    lisa_attention.register_forward_pre_hook(
        lambda module, args: autocast_seen.append(torch.get_autocast_dtype("cpu"))
        if torch.is_autocast_enabled("cpu") else None
    )
    data = torch.randint(3, VOCAB, (16, 16), generator=torch.Generator().manual_seed(0))
    dataset = [{"input_ids": row, "labels": row} for row in data]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=3, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, bf16=True, seed=0, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    assert autocast_seen and set(autocast_seen) == {torch.bfloat16}  # the Trainer trained under bf16 autocast
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses), losses
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        assert changed == ("lisa_" in name), name
        assert bool(torch.isfinite(param).all()), name
