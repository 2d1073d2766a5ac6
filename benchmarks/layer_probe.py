"""Which layer probe picks the best layers? Held-out fidelity of the layers each probe criterion chooses.

For SmolLM2-135M: capture the calibration windows (the first `--calibration` sampled windows, 128
tokens), run `lisa_peft.pipeline.convert.layer_sensitivity` on the first 16 of them without and with a short
layer-wise fit (`--fit-steps`), take the `--fraction` least sensitive layers under each criterion
("loss": LM-loss increase, "output_kl": KL(base || model)), then convert each distinct layer set
(calibrated init + `--layerwise-steps`, no end-to-end training) and measure the perplexity ratio and
KL on the held-out sets of `benchmarks/fidelity.py` (tinyshakespeare's last 10 %, the pydoc topics).

    python benchmarks/layer_probe.py --r 24 --fraction 0.5

Results: one JSON line per probe and per layer set in benchmarks/results/layer-probe-r{R}.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.fidelity import RESULTS, held_out_sets  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from lisa_peft import LisaConfig
    from lisa_peft.evaluation.fidelity import measure_fidelity
    from lisa_peft.pipeline import calibration as C
    from lisa_peft.pipeline.base_models import load_base_model
    from lisa_peft.pipeline.convert import choose_layers, convert, layer_sensitivity
    from lisa_peft.pipeline.sampled_corpus import sampled_windows

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--r", type=int, default=None, help="rank of the low-rank Q/K (default head_dim/6)")
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--calibration", type=int, default=128, help="sampled windows (first 128 tokens)")
    parser.add_argument("--probe-windows", type=int, default=16)
    parser.add_argument("--fit-steps", type=int, default=100)
    parser.add_argument("--layerwise-steps", type=int, default=300)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    def frozen_base():
        model, tokenizer = load_base_model()
        for p in model.parameters():
            p.requires_grad_(False)
        return model, tokenizer

    model, tokenizer = frozen_base()
    sets = held_out_sets(tokenizer)
    calibration = sampled_windows(model, tokenizer, max(256, args.calibration), 256)[: args.calibration, :128]
    num_layers = model.config.num_hidden_layers
    config = LisaConfig(lisa_layers="auto", target_fraction=args.fraction, init_lisa_weights="calibrate", r=args.r)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"layer-probe-r{args.r or 'default'}.jsonl"

    def record(row: dict) -> None:
        print(json.dumps(row), flush=True)
        with out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")

    inputs = C.capture_attention_inputs(model, calibration, progress=False)
    chosen: dict[str, list[int]] = {}
    for fit in (0, args.fit_steps):
        start = time.monotonic()
        scores = layer_sensitivity(model, inputs, calibration[: args.probe_windows], config, progress=True,
                                   fit_steps=fit, fit_lr=3e-3)
        record({"probe_fit_steps": fit, "seconds": round(time.monotonic() - start, 1),
                "scores": {k: {str(i): round(v, 5) for i, v in d.items()} for k, d in scores.items()}})
        for criterion in ("loss", "output_kl"):
            chosen[f"{criterion}, fit {fit}"] = choose_layers(scores[criterion], num_layers, args.fraction)
    del inputs, model
    done: dict[tuple[int, ...], str] = {}
    for name, layers in chosen.items():
        if tuple(layers) in done:
            record({"probe": name, "layers": layers, "same_as": done[tuple(layers)]})
            continue
        done[tuple(layers)] = name
        base, _ = frozen_base()
        lisa = convert(base, None, LisaConfig(lisa_layers=layers, init_lisa_weights="calibrate", r=args.r),
                       calibration_ids=calibration, layerwise_steps=args.layerwise_steps, layerwise_lr=3e-3,
                       progress=False)
        row = {"probe": name, "layers": layers, "args": vars(args)}
        for text, windows in sets.items():
            f = measure_fidelity(lisa, windows, text, batch_size=8)
            row[text] = {"ppl_ratio": round(f.ppl_ratio, 4), "kl": round(f.kl, 4)}
        record(row)
        del lisa, base
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
