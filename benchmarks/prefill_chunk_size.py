"""Peak memory and time of one plain `model(ids)` call under no-grad, per prefill chunk size.

Usage: ``python benchmarks/prefill_chunk_size.py [--tokens 2048] [--variants base none 256 512 1024]
[--threads 1] [--layers 18-29]``. Every variant runs in a fresh process (this script re-runs itself
with ``--one VARIANT``), so the peak resident set size (``ru_maxrss``) of one variant is not hidden
by another's. Variants: ``base`` (the base model, no adapter), ``none`` (LiSA in one pass) or a
chunk size (LiSA with ``prefill_chunk_size`` = that size). The model is the cached demo base model
(``lisa_peft.pipeline.base_models.load_base_model``), fp32, LiSA layers from ``--layers`` (identity init: the
cost does not depend on the weights). Prints one JSON line per variant and the ratios to ``base``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _one(variant: str, tokens: int, layers: list[int], threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from peft import get_peft_model

    from lisa_peft import LisaConfig
    from lisa_peft.pipeline.base_models import load_base_model

    model, _ = load_base_model()
    if variant != "base":
        size = None if variant == "none" else int(variant)
        model = get_peft_model(model, LisaConfig(lisa_layers=layers, prefill_chunk_size=size)).eval()
    ids = torch.randint(10, 40000, (1, tokens), generator=torch.Generator().manual_seed(0))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"variant": variant, "tokens": tokens, "seconds": round(seconds, 2), "peak_rss_mb": round(peak / 1024),
            "loaded_rss_mb": round(rss_before / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--variants", nargs="+", default=["base", "none", "256", "512", "1024"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", default="18-29")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    low, high = (int(x) for x in args.layers.split("-"))
    layers = list(range(low, high + 1))
    if args.one:
        print(json.dumps(_one(args.one, args.tokens, layers, args.threads)))
        return
    rows = []
    for variant in args.variants:
        command = [sys.executable, __file__, "--one", variant, "--tokens", str(args.tokens), "--threads",
                   str(args.threads), "--layers", args.layers]
        line = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(line))
        print(line, flush=True)
    base = next((row for row in rows if row["variant"] == "base"), None)
    if base:
        for row in rows:
            print(f"{row['variant']:>6}: peak RSS x{row['peak_rss_mb'] / base['peak_rss_mb']:.2f}, "
                  f"time x{row['seconds'] / base['seconds']:.2f} of base")


if __name__ == "__main__":
    main()
