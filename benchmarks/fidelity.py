"""Fidelity ablations: how faithful is a converted model to its base on text it never trained on?

Converts SmolLM2-135M-Instruct with `lisa_peft.convert` (calibrated init + layer-wise stage), optionally
runs the block-wise output-reconstruction stage (`benchmarks/blockwise.py`), then distils end to end
against the base model's cached top-64 log-probabilities (`lisa_peft.pipeline.training.cache_teacher_topk`,
`topk_distillation_kl`; a plain AdamW loop, 10 warm-up steps, cosine over `--steps`). After each stage
and every `--every` steps it prints KL(base || LiSA) and the perplexity ratio LiSA/base
(`lisa_peft.evaluation.fidelity`) on two held-out texts of sources it never trains on:

* ``shakespeare``: the last 10% of ``tinyshakespeare.txt``, development text that is not part of the
  repository: read from the folder ``$LISA_PEFT_HELDOUT_DIR`` names (never copied; left out when unset or absent);
* ``pydoc``: Python's pydoc topics (the demo's held-out text);
16 windows of 256 tokens each, spread evenly over the text. Training and calibration text: windows
sampled from the base model (`lisa_peft.pipeline.sampled_corpus.sampled_windows`).

    python benchmarks/fidelity.py NAME --fraction 0.4 --layerwise-steps 100 --blockwise-steps 100 --steps 200

Results: one JSON line per evaluation point in benchmarks/results/fidelity-NAME.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HELDOUT_DIR_ENV = "LISA_PEFT_HELDOUT_DIR"  # a folder with tinyshakespeare.txt (development text, not shipped)
RESULTS = Path(__file__).resolve().parent / "results"


def held_out_sets(tokenizer, seq_len: int = 256, n: int = 16) -> dict[str, torch.Tensor]:
    """{"shakespeare": [n, seq_len], "pydoc": [n, seq_len]} token windows spread over each text."""
    from lisa_peft.pipeline.data import embedded_corpus, spread_windows, token_windows

    sets = {}
    folder = os.environ.get(HELDOUT_DIR_ENV)
    shakespeare = Path(folder).expanduser() / "tinyshakespeare.txt" if folder else None
    if shakespeare is not None and shakespeare.is_file():
        text = shakespeare.read_text(encoding="utf-8")
        sets["shakespeare"] = spread_windows(token_windows(tokenizer, [text[int(len(text) * 0.9):]], seq_len), n)
    sets["pydoc"] = spread_windows(token_windows(tokenizer, embedded_corpus(), seq_len), n)
    return sets


def main(argv: list[str] | None = None) -> int:
    from lisa_peft import LisaConfig
    from lisa_peft.evaluation.fidelity import measure_fidelity
    from lisa_peft.pipeline.base_models import load_base_model
    from lisa_peft.pipeline.convert import convert
    from lisa_peft.pipeline.sampled_corpus import sampled_windows
    from lisa_peft.pipeline.training import cache_teacher_topk, topk_distillation_kl

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name")
    parser.add_argument("--fraction", type=float, default=0.4)
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="fixed LiSA layers instead of auto")
    parser.add_argument("--r", type=int, default=None)
    parser.add_argument("--ffn-hidden", type=int, default=None, help="head FFN width F (default 2H)")
    parser.add_argument("--sampled", type=int, default=256, help="sampled training windows of 256 tokens")
    parser.add_argument("--calibration", type=int, default=16, help="calibration windows (first 128 tokens)")
    parser.add_argument("--layerwise-steps", type=int, default=100)
    parser.add_argument("--blockwise-steps", type=int, default=0)
    parser.add_argument("--steps", type=int, default=0, help="end-to-end distillation steps (batch 4)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--every", type=int, default=50)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer = load_base_model()
    for p in model.parameters():
        p.requires_grad_(False)
    sets = held_out_sets(tokenizer)
    data = sampled_windows(model, tokenizer, args.sampled, 256)
    calibration, train = data[: args.calibration, :128], data[args.calibration :]
    layers = {"lisa_layers": args.layers} if args.layers else {"lisa_layers": "auto", "target_fraction": args.fraction}
    start = time.monotonic()
    lisa = convert(model, tokenizer, LisaConfig(**layers, init_lisa_weights="calibrate", r=args.r,
                                          ffn_hidden=args.ffn_hidden),
                   calibration_ids=calibration, layerwise_steps=args.layerwise_steps, layerwise_lr=3e-3)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"fidelity-{args.name}.jsonl"

    def report(tag: str) -> None:
        row = {"name": args.name, "tag": tag, "minutes": round((time.monotonic() - start) / 60, 1),
               "lisa_layers": lisa.peft_config["default"].lisa_layers, "args": vars(args)}
        for text, windows in sets.items():
            f = measure_fidelity(lisa, windows, text, batch_size=8)
            row[text] = {"ppl_ratio": round(f.ppl_ratio, 4), "kl": round(f.kl, 4), "base_ppl": round(f.base_ppl, 3)}
        print(json.dumps(row), flush=True)
        with out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")

    report("converted")
    if args.blockwise_steps:
        from benchmarks.blockwise import blockwise_stage

        blockwise_stage(lisa, "default", calibration, steps=args.blockwise_steps)
        report("blockwise")
    if args.steps:
        teacher = cache_teacher_topk(lisa, train, k=64, batch_size=8)
        params = [p for n, p in lisa.named_parameters() if "lisa_" in n]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * s / args.steps))
        )
        generator = torch.Generator().manual_seed(0)
        lisa.train()
        for step in range(args.steps):
            pick = torch.randint(0, train.shape[0], (4,), generator=generator)
            loss = topk_distillation_kl(lisa(train[pick], use_cache=False).logits, teacher.logprobs[pick],
                                        teacher.ids[pick])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            if (step + 1) % args.every == 0 or step + 1 == args.steps:
                report(f"step{step + 1}")
                lisa.train()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
