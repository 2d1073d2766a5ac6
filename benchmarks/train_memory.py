"""Peak memory of one training step, base vs LiSA, with and without gradient checkpointing.

Usage: ``python benchmarks/train_memory.py [--seq-lens 1024 2048] [--layers demo] [--threads N]
[--model PATH]``.

Every (sequence length, variant, checkpointing) runs in a fresh process (``--one``), so each peak
resident set size (``ru_maxrss``) is its own. One step = forward of one sequence of random token ids
with ``labels`` (the causal-LM loss over the full vocabulary), backward, ``AdamW.step()``:

* ``base``: the base model with the query and key projections of the same layers trainable (the
  weights LiSA replaces), so the backward runs through the same layers as LiSA's;
* ``lisa``: ``get_peft_model(base, LisaConfig(lisa_layers=...))``, only the LiSA weights trainable.

With ``--checkpointing`` both use ``model.gradient_checkpointing_enable(use_reentrant=False)``
(what ``TrainingArguments(gradient_checkpointing=True)`` turns on). Prints one JSON line per run and
a Markdown table; writes ``benchmarks/results/train_memory-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.prefill import build_model, parse_layers, run_child, write_results  # noqa: E402


def run_one(variant: str, seq_len: int, checkpointing: bool, layers: list[int], model_path: str | None = None) -> dict:
    """One training step of `variant` ('base' or 'lisa') on [1, seq_len] random ids; peak RSS and time."""
    import torch

    if variant not in ("base", "lisa"):
        raise ValueError(f"unknown variant {variant!r}: use base or lisa")
    model = build_model(variant, layers, model_path)
    if variant == "base":
        for param in model.parameters():
            param.requires_grad_(False)
        for idx in layers:
            attn = model.model.layers[idx].self_attn
            for proj in (attn.q_proj, attn.k_proj):
                proj.weight.requires_grad_(True)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(3, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    loaded_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "seq_len": seq_len, "checkpointing": checkpointing,
            "trainable_params": sum(p.numel() for p in trainable), "step_s": round(seconds, 2),
            "loaded_rss_mb": round(loaded_kib / 1024), "peak_rss_mb": round(peak_kib / 1024),
            "step_peak_mb": round((peak_kib - loaded_kib) / 1024), "loss": round(loss.item(), 4)}


def table(rows: list[dict]) -> str:
    """Markdown: peak RSS and the step's increase over the loaded model, LiSA next to base."""
    lines = ["| seq_len | gradient checkpointing | base: peak MB (step +MB) | LiSA: peak MB (step +MB) | "
             "LiSA/base peak | LiSA/base step |", "|---|---|---|---|---|---|"]
    for seq_len in sorted({r["seq_len"] for r in rows}):
        for ckpt in (False, True):
            pair = {r["variant"]: r for r in rows if r["seq_len"] == seq_len and r["checkpointing"] == ckpt}
            if set(pair) != {"base", "lisa"}:
                continue
            b, li = pair["base"], pair["lisa"]
            lines.append(f"| {seq_len} | {'yes' if ckpt else 'no'} | {b['peak_rss_mb']} ({b['step_peak_mb']}) | "
                         f"{li['peak_rss_mb']} ({li['step_peak_mb']}) | {li['peak_rss_mb'] / b['peak_rss_mb']:.2f} | "
                         f"{li['step_peak_mb'] / max(b['step_peak_mb'], 1):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--layers", default="demo", help="LiSA layers: 'demo', 'a-b' or 'a,b,c'")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    layers = parse_layers(args.layers)
    if args.one:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(run_one(args.one, args.seq_lens[0], args.checkpointing, layers, args.model)))
        return 0
    rows = []
    for seq_len in args.seq_lens:
        for ckpt in (False, True):
            for variant in ("base", "lisa"):
                command = [sys.executable, __file__, "--one", variant, "--seq-lens",
                           str(seq_len), "--layers", args.layers]
                command += ["--checkpointing"] if ckpt else []
                command += ["--threads", str(args.threads)] if args.threads else []
                command += ["--model", args.model] if args.model else []
                rows.append(run_child(command, {"variant": variant, "seq_len": seq_len, "checkpointing": ckpt}))
    print()
    print(table([r for r in rows if "error" not in r]))
    write_results("train_memory", args.out, {"layers": layers, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
