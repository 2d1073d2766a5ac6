"""How similar are adjacent layers' attention patterns in a base model, with and without re-aligning heads?

LiSA (docs/method.md) rests on the observation that layer l's attention resembles layer l-1's once the heads
are matched up. For every layer l >= 1 and head i this module measures the Jensen-Shannon divergence (natural
log, so between 0 and ln 2 = 0.693) between the attention distributions over keys of

- "same head": layer l head i and layer l-1 head i;
- "best aligned": layer l head i and the head j of layer l-1 that is closest to it (argmin over j; several
  heads i may pick the same j, so this is an alignment, not necessarily a permutation),

averaged over the valid query rows of every sequence (rows of padding tokens excluded). The full matrix of
mean JS between every head pair is kept as well (`pairwise_js`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..extras import require
from ..tuners.lisa import transformers_compat as compat

__all__ = ["adjacent_layer_similarity", "analyze", "attention_maps", "pairwise_js_sums", "plot_similarity"]

# Upper bound for the [B, chunk, H, T, T] temporary of `pairwise_js_sums` when no head_chunk is given.
_CHUNK_BYTES = 256 * 2**20


@torch.no_grad()
def attention_maps(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Per-layer attention probabilities of a causal LM: a list (one per layer) of float32 [B, H, T, T]
    (query x key; rows sum to 1). `input_ids`, `attention_mask`: [B, T]. Runs the decoder only (no LM head)
    with eager attention, restoring the model's attention implementation afterwards."""
    previous = compat.attn_implementation(model)
    if previous != "eager":
        model.set_attn_implementation("eager")
    try:
        decoder = getattr(model, "base_model", model)
        out = decoder(
            input_ids=input_ids, attention_mask=attention_mask, output_attentions=True, use_cache=False
        )
    finally:
        if previous != "eager":
            model.set_attn_implementation(previous)
    return [a.float() for a in out.attentions]


def _neg_entropy(p: torch.Tensor) -> torch.Tensor:
    """sum_k p log p over the last axis: [..., K] -> [...]."""
    return torch.xlogy(p, p).sum(-1)


def _pairwise_js_layer(
    p: torch.Tensor, q: torch.Tensor, rows: torch.Tensor, head_chunk: int | None
) -> torch.Tensor:
    """Sum over valid rows of JS(p head i, q head j): p [B, H, T, K], q [B, H', T, K], rows bool [B, T]
    -> float64 [H, H']. JS = H(m) - (H(p) + H(q)) / 2 with m = (p + q) / 2, computed a few heads of p at a
    time so the [B, chunk, H', T, K] temporary stays small."""
    b, h, t, k = p.shape
    hq = q.shape[1]
    if head_chunk is None:
        head_chunk = max(1, _CHUNK_BYTES // (2 * b * hq * t * k * p.element_size()))
    neg_p, neg_q = _neg_entropy(p), _neg_entropy(q)  # [B, H, T], [B, H', T]
    valid = rows[:, None, None, :]  # [B, 1, 1, T]
    out = torch.empty(h, hq, dtype=torch.float64)
    for i0 in range(0, h, head_chunk):
        i1 = min(h, i0 + head_chunk)
        m = 0.5 * (p[:, i0:i1, None] + q[:, None])  # [B, c, H', T, K]
        js = 0.5 * (neg_p[:, i0:i1, None] + neg_q[:, None]) - _neg_entropy(m)  # [B, c, H', T]
        js = torch.where(valid, js.clamp_min(0.0), torch.zeros((), dtype=js.dtype))
        out[i0:i1] = js.sum(dim=(0, 3), dtype=torch.float64)
    return out


def pairwise_js_sums(
    maps: Sequence[torch.Tensor],
    mask: torch.Tensor | None = None,
    head_chunk: int | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, int]:
    """Un-normalised adjacent-layer JS, for accumulating over batches.

    `maps`: L tensors [B, H, T, T]; `mask`: [B, T] (nonzero = real token) or None (all valid).
    Returns (sums, rows): float64 [L-1, H, H] where sums[l-1, i, j] = sum over valid query rows of
    JS(layer l head i, layer l-1 head j), and the number of valid rows (summed over the batch).
    """
    if len(maps) < 2:
        raise ValueError("Need the attention maps of at least two layers")
    b, _, t, _ = maps[0].shape
    rows = torch.ones(b, t, dtype=torch.bool) if mask is None else mask.to(device=maps[0].device).bool()
    sums = torch.stack([
        _pairwise_js_layer(maps[layer], maps[layer - 1], rows, head_chunk)
        for layer in tqdm(range(1, len(maps)), desc="JS per layer", leave=False, disable=not progress)
    ])
    return sums, int(rows.sum())


def _summarise(sums: torch.Tensor, rows: int) -> dict:
    """JSON-ready numbers from `pairwise_js_sums` output (keys: see `adjacent_layer_similarity`)."""
    if rows == 0:
        raise ValueError("No valid query rows (the mask is all zero)")
    mean = sums / rows  # [L-1, H, H]
    same = torch.diagonal(mean, dim1=1, dim2=2)  # [L-1, H]
    best, aligned = mean.min(dim=-1)  # [L-1, H]
    return {
        "layers": list(range(1, mean.shape[0] + 1)),
        "same_head_js": same.mean(-1).tolist(),
        "best_aligned_js": best.mean(-1).tolist(),
        "same_head_js_per_head": same.tolist(),
        "best_aligned_js_per_head": best.tolist(),
        "aligned_head": aligned.tolist(),
        "pairwise_js": mean.tolist(),
        "num_rows": rows,
    }


def adjacent_layer_similarity(
    maps: Sequence[torch.Tensor], mask: torch.Tensor | None = None, head_chunk: int | None = None
) -> dict:
    """Jensen-Shannon divergence (nats) between adjacent layers' attention, averaged over valid query rows.

    `maps`: L tensors [B, H, T, T] (as from `attention_maps`); `mask`: [B, T], nonzero = real token (rows of
    padding are ignored), None = all valid. Entries are indexed by layer l = 1..L-1 (comparing l with l-1):

    - ``layers``: [L-1] the l values;
    - ``same_head_js`` / ``best_aligned_js``: [L-1] means over heads;
    - ``same_head_js_per_head`` / ``best_aligned_js_per_head``: [L-1][H];
    - ``aligned_head``: [L-1][H] the head j of layer l-1 that best matches head i of layer l;
    - ``pairwise_js``: [L-1][H][H] mean JS(layer l head i, layer l-1 head j);
    - ``num_rows``: number of query rows averaged over.
    """
    return _summarise(*pairwise_js_sums(maps, mask, head_chunk))


def plot_similarity(result: dict, path: str | Path) -> None:
    """PNG: per-layer mean JS (same head vs best aligned) and a heads x layers heatmap of best-aligned JS
    annotated with the aligned head index. Adds the per-layer ``sensitivity`` on a second axis if present."""
    matplotlib = require("matplotlib", "plot", "Plotting the head-similarity analysis")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result["layers"]
    best = torch.tensor(result["best_aligned_js_per_head"]).T  # [H, L-1]
    aligned = result["aligned_head"]
    num_heads = best.shape[0]
    fig, (ax_line, ax_map) = plt.subplots(
        2, 1, figsize=(max(8.0, 0.38 * len(layers) + 2.5), 8.5), gridspec_kw={"height_ratios": [1, 1.1]},
        constrained_layout=True,
    )
    ax_line.plot(layers, result["same_head_js"], "o-", color="tab:red", label="same head i (l vs l-1)")
    ax_line.plot(
        layers, result["best_aligned_js"], "s-", color="tab:blue", label="best-aligned head (min over j)"
    )
    ax_line.set_xlabel("layer l (compared with layer l-1)")
    ax_line.set_ylabel("mean Jensen-Shannon divergence (nats)")
    ax_line.set_title(
        f"Adjacent-layer attention similarity - {result.get('model', '')} "
        f"({result.get('num_sequences', '?')} x {result.get('seq_len', '?')} tokens; lower = more similar)"
    )
    ax_line.set_xticks(range(0 if "sensitivity" in result else layers[0], layers[-1] + 1))
    ax_line.set_xlim((-0.5 if "sensitivity" in result else layers[0] - 0.5), layers[-1] + 0.5)
    ax_line.set_ylim(bottom=0)
    ax_line.grid(alpha=0.3)
    handles, labels = ax_line.get_legend_handles_labels()
    if "sensitivity" in result:
        ax_sens = ax_line.twinx()
        sens = result["sensitivity"]
        xs = [i for i, v in enumerate(sens) if v is not None]
        ax_sens.plot(xs, [sens[i] for i in xs], "^--", color="tab:green", label="sensitivity (layer l)")
        ax_sens.set_ylabel(result.get("sensitivity_unit", "sensitivity"))
        more_h, more_l = ax_sens.get_legend_handles_labels()
        handles, labels = handles + more_h, labels + more_l
    ax_line.legend(handles, labels, loc="upper left")

    image = ax_map.imshow(
        best.numpy(), aspect="auto", cmap="viridis", vmin=0.0, origin="lower",
        extent=(layers[0] - 0.5, layers[-1] + 0.5, -0.5, num_heads - 0.5),
    )
    ax_map.set_xticks(layers)
    ax_map.set_yticks(range(num_heads))
    ax_map.set_xlabel("layer l")
    ax_map.set_ylabel("head i of layer l")
    ax_map.set_title("Best-aligned JS per head; number in cell = best-matching head j of layer l-1")
    if best.numel() <= 600:
        threshold = 0.6 * float(best.max()) if best.numel() else 0.0
        for col, layer in enumerate(layers):
            for head in range(num_heads):
                value = float(best[head, col])
                ax_map.text(
                    layer, head, str(aligned[col][head]), ha="center", va="center", fontsize=7,
                    color="black" if value > threshold else "white",
                )
    fig.colorbar(image, ax=ax_map, label="JS divergence (nats)")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def analyze(
    model_name_or_path: str | None = None,
    texts: list[str] | None = None,
    num_sequences: int = 8,
    seq_len: int = 256,
    out_dir: str | Path = "runs/analyze",
    batch_size: int = 4,
    sensitivity_fn: Callable[..., Sequence[float]] | None = None,
    progress: bool = True,
    plot: bool = True,
) -> dict:
    """Measure adjacent-layer attention similarity of a base model; write ``similarity.json`` and (with `plot`,
    which needs the ``plot`` extra, checked before any work) ``similarity.png`` into `out_dir`; return the JSON.

    `model_name_or_path`: as in `lisa_peft.pipeline.base_models.resolve_base_model` (None = the demo model).
    `texts`: calibration sources for `lisa_peft.pipeline.data.load_texts` (text file paths or ``hf:NAME...``; None =
    the embedded pydoc corpus), cut into `num_sequences` windows of `seq_len` tokens, run `batch_size` at a
    time. `sensitivity_fn(model, input_ids [N, T], attention_mask [N, T])` -> one float per layer
    (num_hidden_layers values, None for a layer that was not measured): when given, its result is stored
    under the key ``sensitivity`` (and drawn in the figure); the key is absent otherwise.
    Other keys: those of `adjacent_layer_similarity`, plus the run's settings.
    """
    from lisa_peft.pipeline.base_models import DEMO_MODEL, load_base_model
    from lisa_peft.pipeline.data import chunk_token_windows, load_texts

    if plot:
        require("matplotlib", "plot", "The similarity figure (similarity.png; pass plot=False or --no-plot to skip it)")
    model, tokenizer = load_base_model(model_name_or_path, attn_implementation="eager")
    input_ids = chunk_token_windows(tokenizer, load_texts(texts), num_sequences, seq_len)
    attention_mask = torch.ones_like(input_ids)
    sums, rows = None, 0
    for start in tqdm(range(0, num_sequences, batch_size), desc="attention batches", disable=not progress):
        end = start + batch_size
        maps = attention_maps(model, input_ids[start:end], attention_mask[start:end])
        batch_sums, batch_rows = pairwise_js_sums(maps, attention_mask[start:end], progress=progress)
        del maps
        sums = batch_sums if sums is None else sums + batch_sums
        rows += batch_rows
    result = {
        "model": model_name_or_path or DEMO_MODEL,
        "texts": list(texts) if texts else ["embedded: pydoc_data.topics"],
        "num_sequences": num_sequences,
        "seq_len": seq_len,
        "num_layers": model.config.num_hidden_layers,
        "num_heads": model.config.num_attention_heads,
        "js_unit": f"nats (natural log; maximum ln 2 = {math.log(2):.4f})",
        **_summarise(sums, rows),
    }
    if sensitivity_fn is not None:
        sensitivity = [None if x is None else float(x) for x in sensitivity_fn(model, input_ids, attention_mask)]
        if len(sensitivity) != model.config.num_hidden_layers:
            raise ValueError(
                f"sensitivity_fn returned {len(sensitivity)} values for "
                f"{model.config.num_hidden_layers} layers"
            )
        result["sensitivity"] = sensitivity
        result["sensitivity_unit"] = getattr(sensitivity_fn, "unit", "sensitivity")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "similarity.json").write_text(json.dumps(result, indent=1) + "\n")
    if plot:
        plot_similarity(result, out / "similarity.png")
    return result
