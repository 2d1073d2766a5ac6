"""Held-out perplexity of LiSA vs the base model on tinyshakespeare, and the ablations.

Convention of the project's development text: the first 90% of `tinyshakespeare.txt` is for calibration and
training, the last 10% is held out; perplexity on 512-token windows of the held-out part.

    python benchmarks/quality.py --fractions 0.4 --train-minutes 8          # quality bar
    python benchmarks/quality.py --ablations --layers 2 5 6 7 9 12 14 21 22 25 28 29 --train-minutes 0

Every run converts the base model (`lisa_peft.convert`, automatic layers), optionally trains with
the demo's trainer settings for a wall-clock budget, and reports base / LiSA perplexity and their
ratio. Results go to benchmarks/results/quality-*.json and are printed as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import transformers

RESULTS = Path(__file__).resolve().parent / "results"
ABLATIONS = {
    "default (logits, calibrate, layer-wise)": {},
    "share=probs": {"share": "probs"},
    "init=identity": {"init_lisa_weights": "identity"},
    "init=random": {"init_lisa_weights": "random"},
    "no layer-wise stage": {"_layerwise_steps": 0},
}


def _windows(tokenizer, text: str, seq_len: int, limit: int | None):
    from lisa_peft.pipeline.data import token_windows

    return token_windows(tokenizer, [text], seq_len, limit)


def run_one(name: str, overrides: dict, args, texts: tuple[str, str], base_cache: dict) -> dict:
    """Convert (+ train) one configuration from a fresh base model; perplexities before/after."""
    from lisa_peft import LisaConfig
    from lisa_peft.pipeline.base_models import load_base_model
    from lisa_peft.pipeline.convert import convert
    from lisa_peft.pipeline.training import LisaTrainer, TimeBudgetCallback, TokenWindowDataset, perplexity

    train_text, heldout_text = texts
    overrides = dict(overrides)
    layerwise_steps = overrides.pop("_layerwise_steps", args.layerwise_steps)
    start = time.monotonic()
    model, tokenizer = load_base_model(args.model)
    evaluation = _windows(tokenizer, heldout_text, 512, args.eval_windows)
    if "base" not in base_cache:
        base_cache["base"] = perplexity(model, evaluation, progress=True, desc="base ppl")
    layers = {"lisa_layers": args.layers} if args.layers else {"lisa_layers": "auto", "target_fraction": args.fraction}
    config = LisaConfig(**layers, **{"init_lisa_weights": "calibrate", **overrides})
    calibration = Path(args.workdir) / "calibration.txt"
    calibration.write_text(train_text)
    lisa = convert(model, tokenizer, config, [str(calibration)], num_sequences=16, seq_len=128,
                   layerwise_steps=layerwise_steps, layerwise_lr=3e-3, progress=True)
    chosen = lisa.peft_config["default"].lisa_layers
    result = {"name": name, "fraction": len(chosen) / model.config.num_hidden_layers, "lisa_layers": chosen,
              "base_ppl": base_cache["base"], "lisa_ppl_converted": perplexity(lisa, evaluation, progress=True)}
    if args.train_minutes > 0:
        train = _windows(tokenizer, train_text, 256, 4096)
        trainer = LisaTrainer(
            model=lisa,
            args=transformers.TrainingArguments(
                output_dir=str(Path(args.workdir) / "train"), max_steps=args.max_steps, per_device_train_batch_size=4,
                learning_rate=2e-3, lr_scheduler_type="cosine", warmup_steps=10, logging_steps=10,
                save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=False,
            ),
            train_dataset=TokenWindowDataset(train), distill_weight=0.5,
            callbacks=[TimeBudgetCallback(60 * args.train_minutes)],
        )
        trainer.train()
        result["train_steps"] = trainer.state.global_step
        result["lisa_ppl_trained"] = perplexity(lisa, evaluation, progress=True)
    final = result.get("lisa_ppl_trained", result["lisa_ppl_converted"])
    result["ratio_to_base"] = final / result["base_ppl"]
    result["seconds"] = time.monotonic() - start
    print(json.dumps(result), flush=True)
    return result


def table(results: list[dict]) -> str:
    lines = ["| run | LiSA layers | base ppl | after convert | after training | ratio |", "|---|---|---|---|---|---|"]
    for r in results:
        trained = f"{r['lisa_ppl_trained']:.2f} ({r['train_steps']} steps)" if "lisa_ppl_trained" in r else "-"
        lines.append(
            f"| {r['name']} | {len(r['lisa_layers'])} ({r['fraction']:.0%}) | {r['base_ppl']:.2f} | "
            f"{r['lisa_ppl_converted']:.2f} | {trained} | {r['ratio_to_base']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Base model (default: the embedded SmolLM2-135M).")
    parser.add_argument("--data", required=True,
                        help="tinyshakespeare.txt: development text, not shipped (read only, never copied).")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.4])
    parser.add_argument("--train-minutes", type=float, default=8.0)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--layerwise-steps", type=int, default=100)
    parser.add_argument("--eval-windows", type=int, default=16, help="512-token held-out windows (all: ~70).")
    parser.add_argument("--ablations", action="store_true", help="Run the ablation set at each fraction.")
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="Fixed LiSA layers instead of lisa_layers='auto' (e.g. to compare ablations).")
    parser.add_argument("--workdir", default="runs/quality")
    args = parser.parse_args(argv)
    text = Path(args.data).read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    texts = (text[:cut], text[cut:])
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    runs = ABLATIONS if args.ablations else {"default (logits, calibrate, layer-wise)": {}}
    results, base_cache = [], {}
    for fraction in args.fractions:
        args.fraction = fraction
        for name, overrides in runs.items():
            results.append(run_one(name, overrides, args, texts, base_cache))
    kind = "ablations" if args.ablations else "quality"
    out = RESULTS / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(table(results))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
