"""Check that cached generation is what the model computes: the guard against a silently broken KV cache.

A LiSA model whose KV cache path is broken (transformers 5.24 renamed the cache argument, and LiSA
layers silently decoded without their cache) still runs, still reports a good perplexity (which is
computed without a cache) and writes garbage. `verify_cached_generation` compares, for greedy
decoding, three computations of the same thing:

1. `generate(use_cache=True)`: what users run;
2. `generate(use_cache=False)`: every step recomputes the whole sequence;
3. one full forward over the cached run's tokens (teacher forcing): its argmax at each step.

The tokens must be identical. Where floating-point noise flips a near-tie, the sequences may part
there: that is accepted only if, at that step, the three computations' logits agree within `atol`
and the two tokens' logits are within `atol` of each other; the comparison stops at that step. At
every other step the logits must agree within `logit_atol`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class CachedGenerationMismatch(RuntimeError):
    """Cached generation disagrees with the model's full forward (a broken KV-cache path)."""


@dataclass
class GenerationCheck:
    """What `verify_cached_generation` compared and found (all on the steps before any accepted tie flip)."""

    steps_compared: int
    max_logit_diff_cached_vs_full: float
    max_logit_diff_cached_vs_uncached: float
    tie_flip_step: int | None
    sequences: torch.Tensor  # [B, P + new] of the cached run


@torch.no_grad()
def verify_cached_generation(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 16,
    atol: float = 1e-4,
    logit_atol: float = 1e-3,
) -> GenerationCheck:
    """Greedy-generate `max_new_tokens` after `input_ids` [B, P] three ways and compare (module docstring).

    atol: how close the logits must be at a step where a near-tie flips the token; logit_atol: how close
    cached and recomputed logits must be at every other step (fp32 reorderings of a 30-layer model give
    about 1e-4; a cache that does not reach LiSA layers gives differences of order 1).

    Raises `CachedGenerationMismatch` naming the batch row, step and logit differences on failure.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    common = dict(
        attention_mask=attention_mask, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
        do_sample=False, output_logits=True, return_dict_in_generate=True,
    )
    cached = model.generate(input_ids, use_cache=True, **common)
    uncached = model.generate(input_ids, use_cache=False, **common)
    prompt_len = input_ids.shape[1]
    sequences = cached.sequences
    generated_mask = attention_mask.new_ones(sequences.shape[0], sequences.shape[1] - prompt_len)
    full_mask = torch.cat([attention_mask, generated_mask], dim=1)
    full_logits = model(input_ids=sequences, attention_mask=full_mask, use_cache=False).logits.float()

    steps = len(cached.logits)
    max_full = max_uncached = 0.0
    flip: int | None = None
    for t in range(steps):
        pos = prompt_len + t
        step_cached = cached.logits[t].float()
        step_uncached = uncached.logits[t].float()
        step_full = full_logits[:, pos - 1]
        diff_full = (step_cached - step_full).abs().amax(-1)  # [B]
        diff_uncached = (step_cached - step_uncached).abs().amax(-1)
        tokens = torch.stack([sequences[:, pos], uncached.sequences[:, pos], step_full.argmax(-1)])
        agree = (tokens == tokens[0]).all(0)
        if not bool(agree.all()):
            for b in (~agree).nonzero().flatten().tolist():
                chosen = step_full[b, tokens[:, b]]
                near_tie = float(chosen.max() - chosen.min()) <= atol
                if not (near_tie and float(diff_full[b]) <= atol and float(diff_uncached[b]) <= atol):
                    raise CachedGenerationMismatch(
                        f"Cached generation disagrees with the model at step {t} of row {b}: tokens cached / "
                        f"uncached / full-forward argmax = {tokens[:, b].tolist()}, max |logit diff| cached vs full "
                        f"forward {float(diff_full[b]):.3g}, cached vs uncached {float(diff_uncached[b]):.3g} "
                        f"(allowed {atol:g} at a near-tie). The KV-cache path of this model is broken: check the "
                        "transformers version (lisa_peft.tuners.lisa.transformers_compat names the tested range)."
                    )
            flip = t
            break
        if not (float(diff_full.max()) <= logit_atol and float(diff_uncached.max()) <= logit_atol):
            b = int(torch.maximum(diff_full, diff_uncached).argmax())
            raise CachedGenerationMismatch(
                f"Cached decoding's logits differ from the model's at step {t} (row {b}): max |diff| vs full "
                f"forward {float(diff_full[b]):.3g}, vs uncached generation {float(diff_uncached[b]):.3g}, allowed "
                f"{logit_atol:g}. "
                "The KV-cache path of this model is broken: check the transformers version "
                "(lisa_peft.tuners.lisa.transformers_compat names the tested range)."
            )
        max_full = max(max_full, float(diff_full.max()))
        max_uncached = max(max_uncached, float(diff_uncached.max()))
    return GenerationCheck(
        steps_compared=steps if flip is None else flip,
        max_logit_diff_cached_vs_full=max_full,
        max_logit_diff_cached_vs_uncached=max_uncached,
        tie_flip_step=flip,
        sequences=sequences,
    )
