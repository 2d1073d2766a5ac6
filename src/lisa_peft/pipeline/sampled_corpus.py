"""Data-free distillation text: token windows sampled from the base model itself, cached once.

A LiSA conversion should keep the model's behaviour on *any* text, so the default training and
calibration text is the base model's own distribution (as LLM-QAT does for quantisation): no corpus
to ship or download, and no domain that the adapter would over-fit to. Each window starts with the
tokenizer's BOS token (EOS when there is none) and is sampled with temperature 1, no top-k/top-p
(the model's true distribution); EOS is suppressed until the window is full, so every window has
exactly `seq_len` tokens (a decision of ours: a window that stops early would waste compute).

Sampling costs a few minutes on a CPU, so the windows are cached under
``<lisa_peft cache>/corpora/`` keyed by a fingerprint of the model (config + a checksum of its
weights) and of the sampling settings; the file is written atomically (temporary file + rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .base_models import default_cache_dir

__all__ = ["model_fingerprint", "sample_windows", "sampled_windows"]


@torch.no_grad()
def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the model's config and weights (different weights -> a different fingerprint)."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().float().flatten()
        step = max(1, flat.numel() // 4096)
        digest.update(name.encode())
        digest.update(flat[::step].double().sum().item().hex().encode())
        digest.update(flat.abs().double().sum().item().hex().encode())
    return digest.hexdigest()[:16]


BATCH = 32  # windows per generate call; batch b is sampled with seed (seed, b), so any N is a prefix of a larger N


@torch.no_grad()
def _sample_batch(model, tokenizer, n: int, seq_len: int, seed: int) -> torch.Tensor:
    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start_id is None:
        raise ValueError("Sampling needs a tokenizer with a BOS or EOS token to start from.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start_id
    device = next(model.parameters()).device
    prompt = torch.full((n, 1), start_id, dtype=torch.long, device=device)
    torch.manual_seed(seed)
    out = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
        max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1, pad_token_id=pad_id,
    )
    return out[:, :seq_len].cpu()


@torch.no_grad()
def sample_windows(
    model, tokenizer, num_sequences: int, seq_len: int, seed: int = 0, progress: bool = True, first_batch: int = 0
) -> torch.Tensor:
    """LongTensor [num_sequences, seq_len] sampled from `model` (BOS first, temperature 1, no EOS).

    Windows come in batches of `BATCH`, batch b sampled under the seed `seed * 100003 + b`: the
    result for N windows is the first N rows of the result for any larger N. `first_batch` starts
    at a later batch (to extend an earlier sample)."""
    if num_sequences < 1 or seq_len < 2:
        raise ValueError(f"num_sequences must be >= 1 and seq_len >= 2, got {num_sequences}, {seq_len}.")
    was_training = model.training
    model.eval()
    generator_state = torch.random.get_rng_state()
    batches = range(first_batch, first_batch + -(-num_sequences // BATCH))
    rows = []
    try:
        for b in tqdm(batches, desc="sampling text from the base model", disable=not progress):
            rows.append(_sample_batch(model, tokenizer, BATCH, seq_len, seed * 100003 + b))
    finally:
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return torch.cat(rows)[:num_sequences]


def sampled_windows(
    model,
    tokenizer,
    num_sequences: int,
    seq_len: int,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """`sample_windows`, cached: [num_sequences, seq_len]. The cache file of a (model, seq_len, seed)
    holds every window sampled so far; a larger request samples only the missing batches."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "corpora"
    path = folder / f"samples-{model_fingerprint(model)}-len{seq_len}-seed{seed}.pt"
    have = torch.load(path, weights_only=True) if path.is_file() else torch.empty(0, seq_len, dtype=torch.long)
    if have.dim() != 2 or have.shape[1] != seq_len or have.shape[0] % BATCH:
        have = torch.empty(0, seq_len, dtype=torch.long)  # unreadable or foreign: sample again
    if have.shape[0] >= num_sequences:
        return have[:num_sequences]
    missing = num_sequences - have.shape[0]
    more = sample_windows(model, tokenizer, -(-missing // BATCH) * BATCH, seq_len, seed, progress,
                          first_batch=have.shape[0] // BATCH)
    windows = torch.cat([have, more])
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(windows, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return windows[:num_sequences]
