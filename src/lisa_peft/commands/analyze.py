"""`lisa-peft analyze [MODEL]`: adjacent-layer attention similarity of a base model (JSON + PNG);
`lisa-peft analyze --adapter ADAPTER`: what a LiSA adapter trades (its operating point, JSON + one line)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lisa_peft.pipeline.base_models import DEMO_MODEL, BaseModelUnavailableError


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "analyze",
        help="measure how similar adjacent layers' attention is (same head vs best-aligned head)",
        description=(
            "Run calibration text through MODEL with eager attention and measure, for every layer l >= 1, "
            "the Jensen-Shannon divergence between the attention of layer l and layer l-1: head i vs head i, "
            "and head i vs its best-matching head. Writes similarity.json and similarity.png into --out."
        ),
    )
    parser.add_argument(
        "model", nargs="?", default=None, help=f"alias, Hub id or path (default: {DEMO_MODEL})"
    )
    parser.add_argument(
        "--text", nargs="+", default=None, metavar="FILE",
        help="calibration text files, or hf:NAME[:CONFIG][:SPLIT] (default: Python's pydoc help texts)",
    )
    parser.add_argument("--num-sequences", type=int, default=8, help="number of token windows (default: 8)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window (default: 256)")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default: 4)")
    parser.add_argument("--out", default="runs/analyze", help="output folder (default: runs/analyze)")
    parser.add_argument(
        "--sensitivity", action="store_true",
        help="also measure per-layer LiSA sensitivity: the LM-loss increase when each layer alone is a "
        "calibrated LiSA layer (what lisa_layers='auto' ranks by; one model forward per layer)",
    )
    parser.add_argument(
        "--adapter", default=None, metavar="ADAPTER",
        help="instead of measuring MODEL: state what this LiSA adapter (folder or Hub id) trades: fraction of "
        "layers, Q/K compression, KV-cache and parameter bytes saved, recorded fidelity (writes "
        "operating_point.json into --out; reads configs only, no weights). MODEL defaults to the adapter's base",
    )
    parser.add_argument("--no-plot", action="store_true",
                        help="write only similarity.json (the figure needs: pip install 'lisa-peft[plot]')")
    parser.set_defaults(func=run)
    return parser


def run_operating_point(args: argparse.Namespace) -> int:
    import json

    from transformers import AutoConfig

    from lisa_peft import LisaConfig
    from lisa_peft.evaluation.operating_point import operating_point
    from lisa_peft.pipeline.base_models import resolve_base_model

    try:
        config = LisaConfig.from_pretrained(args.adapter)
        if not isinstance(config.lisa_layers, list):
            raise ValueError(f"{args.adapter}: lisa_layers is {config.lisa_layers!r}, not a resolved list of layers.")
        base = args.model or config.base_model_name_or_path
        if not base:
            raise ValueError(f"{args.adapter} does not name its base model: pass it as MODEL.")
        point = operating_point(config, AutoConfig.from_pretrained(resolve_base_model(base)))
    except (BaseModelUnavailableError, OSError, ValueError) as err:
        print(f"lisa-peft analyze: {err}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "operating_point.json").write_text(json.dumps(point.as_dict(), indent=2) + "\n")
    print(point.describe())
    print(f"wrote {out / 'operating_point.json'}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.adapter:
        return run_operating_point(args)
    from lisa_peft.evaluation.analysis import analyze
    from lisa_peft.pipeline.convert import lisa_sensitivity

    try:
        result = analyze(
            args.model, texts=args.text, num_sequences=args.num_sequences, seq_len=args.seq_len,
            out_dir=args.out, batch_size=args.batch_size,
            sensitivity_fn=lisa_sensitivity if args.sensitivity else None, plot=not args.no_plot,
        )
    except (BaseModelUnavailableError, FileNotFoundError, ValueError) as err:
        print(f"lisa-peft analyze: {err}", file=sys.stderr)
        return 1
    sensitivity = result.get("sensitivity")
    print(f"{'layer':>5}  {'same-head JS':>12}  {'best-aligned JS':>15}" + ("  sensitivity" if sensitivity else ""))
    for layer, same, best in zip(result["layers"], result["same_head_js"], result["best_aligned_js"]):
        extra = ""
        if sensitivity:
            value = sensitivity[layer]
            extra = f"  {value:>11.4f}" if value is not None else f"  {'(full)':>11}"
        print(f"{layer:>5}  {same:>12.4f}  {best:>15.4f}{extra}")
    out = Path(args.out)
    print(f"wrote {out / 'similarity.json'}" + ("" if args.no_plot else f" and {out / 'similarity.png'}"))
    return 0
