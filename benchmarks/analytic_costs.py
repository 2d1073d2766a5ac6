"""Print the analytic per-layer decode cost table (markdown): full attention vs LiSA.

Usage: ``python -m benchmarks.analytic_costs [--contexts 1024 4096 8192] [--bytes-per-element 2]``
(or ``python benchmarks/analytic_costs.py``).  Nothing is timed; formulas are in benchmarks/costs.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.costs import (  # noqa: E402
    MODELS,
    LayerCost,
    ModelShape,
    full_attention_cost,
    lisa_cost,
    lisa_decode_kernel_flops,
)


def _m(x: int) -> str:
    return f"{x / 1e6:,.2f}"


def table(models: tuple[ModelShape, ...], contexts: list[int], bytes_per_el: int = 2) -> str:
    """Markdown table: one row per (model, context, layer kind); FLOPs in MFLOP, bytes in MB (1e6)."""
    lines = [
        "| model | N | layer | r | F | proj MFLOP | attn MFLOP | total MFLOP | weights MB | KV cache MB "
        "| prev logits MB | total MB read | vs full (FLOP / bytes) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in models:
        for n in contexts:
            full = full_attention_cost(m, n, bytes_per_el)
            lisa = lisa_cost(m, n, bytes_per_el)
            rows: list[tuple[str, LayerCost, str, str]] = [
                ("full", full, "-", "-"),
                ("LiSA", lisa, str(m.r), str(m.F)),
            ]
            for kind, c, r, f in rows:
                ratio = f"{c.flops / full.flops:.3f} / {c.bytes_read / full.bytes_read:.3f}"
                lines.append(
                    f"| {m.name} | {n} | {kind} | {r} | {f} | {_m(c.proj_flops)} | {_m(c.attn_flops)} | "
                    f"{_m(c.flops)} | {_m(c.weight_bytes)} | {_m(c.cache_bytes)} | {_m(c.logit_bytes)} | "
                    f"{_m(c.bytes_read)} | {ratio} |"
                )
    return "\n".join(lines)


def kernel_table(models: tuple[ModelShape, ...], contexts: list[int]) -> str:
    """Markdown: LiSA attention MFLOP as counted above vs as the shipped Triton decode kernel executes them."""
    lines = ["| model | N | LiSA attn MFLOP (counted) | executed by lisa_decode | executed / counted |",
             "|---|---:|---:|---:|---:|"]
    for m in models:
        for n in contexts:
            counted = lisa_cost(m, n).attn_flops
            executed = lisa_decode_kernel_flops(m, n)
            lines.append(f"| {m.name} | {n} | {_m(counted)} | {_m(executed)} | {executed / counted:.1f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--bytes-per-element", type=int, default=2, help="2 = fp16 weights, cache, logits")
    args = parser.parse_args(argv)
    print(f"Per-layer decode cost of one new token ({args.bytes_per_element}-byte elements; "
          "softmax, RoPE, norms and the MLP block excluded; LiSA r = ceil(D/6) rounded up to even, F = 2H).\n")
    print(table(MODELS, args.contexts, args.bytes_per_element))
    print("\nWhat the shipped Triton decode kernels execute (lisa_kernels/decode.py: the head FFN once per key "
          "tile for all heads, then softmax and P.V per kv head; tl.dot dimensions padded to powers of two >= 16; "
          "fp32 'ieee' dots):\n")
    print(kernel_table(MODELS, args.contexts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
