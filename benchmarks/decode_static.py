"""Greedy decode time per token: base vs PEFT LiSA vs compact LiSA, dynamic / static / static + compile.

    python benchmarks/decode_static.py [--prompt 256] [--new 32] [--repeats 3] [--threads 1]
                                       [--compile-backend inductor] [--no-compile]

The demo model (SmolLM2-135M, `lisa_peft.pipeline.base_models`) with LiSA in layers 18-29 (identity init: the speed
does not depend on the weights). Each variant runs `generate` (one untimed warm-up, which also compiles),
then the median over `--repeats` of [time(generate `--new` tokens) - time(generate 1 token)] / (`--new` - 1),
i.e. the decode step alone. "static + compile" is transformers' own route: `cache_implementation="static"`
with a `CompileConfig` (compiled decode step, fullgraph). On CPU pass `--threads 1` when the machine is shared.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import CompileConfig  # noqa: E402

import lisa_peft  # noqa: E402,F401
from lisa_peft import LisaConfig  # noqa: E402


def _generate_seconds(model, ids: torch.Tensor, new: int, **kwargs) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kwargs)
    return time.perf_counter() - start


def decode_ms(model, ids: torch.Tensor, new: int, repeats: int, **kwargs) -> float:
    """Median milliseconds per decode step (see module docstring)."""
    _generate_seconds(model, ids, new, **kwargs)  # warm-up (compiles when asked)
    steps = []
    for _ in range(repeats):
        steps.append((_generate_seconds(model, ids, new, **kwargs) - _generate_seconds(model, ids, 1, **kwargs))
                     / (new - 1))
    return 1000 * statistics.median(steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from lisa_peft.pipeline.base_models import load_base_model

    base, _ = load_base_model()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = base.to(device).eval()
    ids = torch.randint(100, 10000, (1, args.prompt), generator=torch.Generator().manual_seed(0)).to(device)
    lisa = get_peft_model(base, LisaConfig(lisa_layers=list(range(18, 30)))).eval()
    compact = lisa.merge_and_unload()
    compile_config = CompileConfig(fullgraph=True, backend=args.compile_backend,
                                   mode="reduce-overhead" if device == "cuda" else None)
    compile_config._compile_all_devices = True
    caches = {"dynamic": {}, "static": {"cache_implementation": "static"}}
    if not args.no_compile:
        caches["static + compile"] = {"cache_implementation": "static", "compile_config": compile_config}
    print(f"device {device}, prompt {args.prompt} tokens, {args.new} new tokens, ms per decode step (median of "
          f"{args.repeats})")
    print("| cache | base | PEFT LiSA | compact LiSA | compact / base |")
    print("|---|---|---|---|---|")
    for name, kwargs in caches.items():
        with lisa.disable_adapter():
            t_base = decode_ms(lisa, ids, args.new, args.repeats, **kwargs)
        t_lisa = decode_ms(lisa, ids, args.new, args.repeats, **kwargs)
        t_compact = decode_ms(compact, ids, args.new, args.repeats, **kwargs)
        print(f"| {name} | {t_base:.1f} | {t_lisa:.1f} | {t_compact:.1f} | {t_compact / t_base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
