"""Long prompts, base vs LiSA, the way a user runs them: peak memory, prefill time, decode tokens/s.

Usage: ``python benchmarks/prefill.py [--tokens 1024 2048 4096 8192 16384] [--new-tokens 32]
[--layers demo] [--variants base lisa] [--call generate] [--threads N] [--model PATH]``.

Every (prompt length, variant) runs in a fresh process (the script re-runs itself with ``--one``), so
one run's peak resident set size is not hidden by another's. In that process:

* ``base``: the base model as ``AutoModelForCausalLM.from_pretrained`` gives it (sdpa attention);
* ``lisa``: the same base with ``get_peft_model(base, LisaConfig(lisa_layers=...))``, library
  defaults otherwise (so the default ``prefill_chunk_size`` applies: nothing is chunked by hand);
* ``lisa-chunk=N``: LiSA with ``prefill_chunk_size=N`` (``0`` = one pass), to compare chunk sizes;
* ``base-growing``: the base model with every layer's cache stored as LiSA stores its layers'
  (``growing_cache.GrowingLayer``: appends into spare room, no ``torch.cat`` of the layer per token).
  A control, not a product variant: it separates what LiSA's decode speed owes to that storage from
  what it owes to the method (smaller K, no full Q/K projections).

``--call generate`` (default) times ``model.generate(ids, max_new_tokens=S, min_new_tokens=S)``
(greedy) with a streamer that records when each token arrives: the prefill time is the time to the
first new token, decode tokens/s is ``(S - 1) / (last - first)``. ``--call forward`` times one plain
``model(input_ids=ids)`` (what perplexity code runs: logits for every position). The prompt is
random token ids (the cost does not depend on the text; the LiSA weights are the identity init).

``--repeats N`` runs every (length, variant) N times, in rounds that alternate the variant order
(forward, then reversed), and the table shows the median of each figure with its ratio to the base's
median: on a shared CPU one pair of runs can differ by 20 % or more in either direction.

Peak memory is ``ru_maxrss`` of the process (model, prompt, cache, temporaries: what the OS sees).
Prints one JSON line per run, then a Markdown table with the LiSA / base ratios, and writes the
rows to ``benchmarks/results/prefill-<time>.json``. Ratios are measured side by side in one run;
read absolute times on a shared CPU as rough.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# The demo adapter's layers on SmolLM2-135M (recipes/demo_smollm2_cpu.yaml, docs/fidelity.md): 12 of 30.
DEMO_LAYERS = [6, 7, 8, 15, 20, 21, 23, 24, 25, 27, 28, 29]
RESULTS = Path(__file__).resolve().parent / "results"


class TokenClock:
    """A `generate` streamer that records the time at which each batch of new tokens arrives.

    `generate` first puts the prompt, then each new token; `times` holds the new tokens' times.
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def parse_layers(spec: str) -> list[int]:
    """'demo' (the demo's 12/30), 'a-b' (a range) or 'a,b,c'."""
    if spec == "demo":
        return list(DEMO_LAYERS)
    if "-" in spec:
        first, last = (int(x) for x in spec.split("-"))
        return list(range(first, last + 1))
    return sorted(int(x) for x in spec.split(","))


def build_model(variant: str, layers: list[int], model_path: str | None):
    """The model of one variant, in eval mode: 'base', 'lisa', 'lisa-chunk=N' (prefill chunk size) or
    'lisa-r=N' (rank of the low-rank Q/K; library default head_dim/6)."""
    from transformers import AutoModelForCausalLM

    from lisa_peft.pipeline.base_models import resolve_base_model

    model = AutoModelForCausalLM.from_pretrained(resolve_base_model(model_path), dtype="float32",
                                                 attn_implementation="sdpa")
    if variant in ("base", "base-growing"):
        return model.eval()
    from peft import get_peft_model

    from lisa_peft import LisaConfig

    kwargs = {}
    if variant.startswith("lisa-chunk="):
        kwargs["prefill_chunk_size"] = int(variant.split("=", 1)[1])
    elif variant.startswith("lisa-r="):
        kwargs["r"] = int(variant.split("=", 1)[1])
    elif variant != "lisa":
        raise ValueError(f"unknown variant {variant!r}: use base, base-growing, lisa, lisa-chunk=N or lisa-r=N")
    return get_peft_model(model, LisaConfig(lisa_layers=layers, **kwargs)).eval()


def growing_cache_kwargs(model) -> dict:
    """`generate` keyword arguments that hand it an empty cache whose every layer is a `GrowingLayer`."""
    from lisa_peft.tuners.lisa import transformers_compat as compat
    from lisa_peft.tuners.lisa.growing_cache import grow_in_place

    cache = compat.new_cache(model.config)
    for idx in range(len(cache.layers)):
        grow_in_place(cache, idx)
    return compat.cache_kwargs(cache)


def run_one(variant: str, tokens: int, new_tokens: int, call: str, layers: list[int],
            model_path: str | None = None) -> dict:
    """Load one variant, run one prompt of `tokens` random ids through `call`, return the measurements."""
    import torch

    model = build_model(variant, layers, model_path)
    loaded_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    row = {"variant": variant, "tokens": tokens, "call": call, "threads": torch.get_num_threads()}
    with torch.no_grad():
        if call == "generate":
            clock = TokenClock()
            extra = growing_cache_kwargs(model) if variant == "base-growing" else {}
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, streamer=clock, **extra)
            assert out.shape[1] == tokens + new_tokens, out.shape
            row["prefill_s"] = round(clock.times[0] - clock.start, 3)
            decode_s = clock.times[-1] - clock.times[0]
            row["decode_tokens_per_s"] = round((len(clock.times) - 1) / decode_s, 3) if decode_s > 0 else None
        elif call == "forward":
            start = time.perf_counter()
            model(input_ids=ids)
            row["prefill_s"] = round(time.perf_counter() - start, 3)
        else:
            raise ValueError(f"unknown call {call!r}: use generate or forward")
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    row["loaded_rss_mb"] = round(loaded_kib / 1024)
    row["peak_rss_mb"] = round(peak_kib / 1024)
    return row


def _cell(row: dict, base: dict | None, key: str, fmt: str) -> str:
    """`row[key]` formatted, with its ratio to `base[key]` unless `row` is the base itself."""
    value = row.get(key)
    if value is None:
        return "n/a"
    text = format(value, fmt)
    if base is not None and row is not base and base.get(key):
        text += f" (x{value / base[key]:.2f})"
    return text


def ratio_table(rows: list[dict]) -> str:
    """Markdown: per prompt length, base and each LiSA variant with its ratios to base."""
    lines = ["| tokens | variant | peak memory MB (x base) | prefill s (x base) | decode tok/s (x base) |",
             "|---|---|---|---|---|"]
    for tokens in sorted({r["tokens"] for r in rows}):
        group = [r for r in rows if r["tokens"] == tokens]
        base = next((r for r in group if r["variant"] == "base"), None)
        for r in group:
            lines.append(f"| {tokens} | {r['variant']} | {_cell(r, base, 'peak_rss_mb', 'd')} | "
                         f"{_cell(r, base, 'prefill_s', '.2f')} | {_cell(r, base, 'decode_tokens_per_s', '.2f')} |")
    return "\n".join(lines)


def median_rows(rows: list[dict]) -> list[dict]:
    """One row per (tokens, variant): the median of each measured figure over its runs ("runs": how many),
    in the order of first appearance. Rows with an "error" are left out."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if "error" not in row:
            groups.setdefault((row["tokens"], row["variant"]), []).append(row)
    merged = []
    for group in groups.values():
        row = dict(group[0], runs=len(group))
        for key in ("prefill_s", "decode_tokens_per_s", "peak_rss_mb", "loaded_rss_mb"):
            values = [r[key] for r in group if r.get(key) is not None]
            if values:
                median = statistics.median(values)
                row[key] = round(median) if key.endswith("_mb") else round(median, 3)
        merged.append(row)
    return merged


def run_child(command: list[str], describe: dict) -> dict:
    """Run one measurement in a fresh process; its last stdout line is the JSON row. On failure, the row is
    `describe` plus the child's last stderr line as "error" (e.g. an out-of-memory kill), printed either way."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        row = {**describe, "error": (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]}
    else:
        row = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(row), flush=True)
    return row


def write_results(name: str, out: Path | None, payload: dict) -> Path:
    """Write `payload` as JSON to `out` or benchmarks/results/<name>-<time>.json; returns the path."""
    out = out or RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1))
    print(f"\nwritten: {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated after the prompt")
    parser.add_argument("--variants", nargs="+", default=["base", "lisa"])
    parser.add_argument("--layers", default="demo", help="LiSA layers: 'demo', 'a-b' or 'a,b,c'")
    parser.add_argument("--call", choices=["generate", "forward"], default="generate")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each run")
    parser.add_argument("--model", default=None, help="base model path or name (default: the demo model)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell (medians; alternating order)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    layers = parse_layers(args.layers)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.one:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        (tokens,) = args.tokens
        print(json.dumps(run_one(args.one, tokens, args.new_tokens, args.call, layers, args.model)))
        return 0
    rows = []
    rounds = [args.variants if i % 2 == 0 else args.variants[::-1] for i in range(args.repeats)]
    for tokens in args.tokens:
        for variant in (v for variants in rounds for v in variants):
            command = [sys.executable, __file__, "--one", variant, "--tokens", str(tokens), "--new-tokens",
                       str(args.new_tokens), "--call", args.call, "--layers", args.layers]
            command += ["--threads", str(args.threads)] if args.threads else []
            command += ["--model", args.model] if args.model else []
            rows.append(run_child(command, {"variant": variant, "tokens": tokens, "call": args.call}))
    print()
    if args.repeats > 1:
        print(f"medians of {args.repeats} runs per cell")
    print(ratio_table(median_rows(rows)))
    write_results("prefill", args.out, {"layers": layers, "call": args.call, "new_tokens": args.new_tokens,
                                        "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
