"""Decode speed and memory of a model with and without LiSA, side by side (batch 1).

Usage: ``python -m benchmarks.decode_speed [--quick] [--contexts 1024 2048 4096 8192] [--steps 16]
[--repeats 3] [--layers 0.4] [--model PATH] [--kernel auto]`` (or ``python benchmarks/decode_speed.py``).

For every context N the script prefills a KV cache of N tokens (in chunks of ``--prefill-chunk``
tokens, so that LiSA's PyTorch prefill never holds N x N logits) once for the base model (the same
PeftModel under ``disable_adapter()``, i.e. the untouched base attention) and once for LiSA, then
times ``--steps`` greedy decode steps from that cache. Repeats are interleaved (base, LiSA, base,
LiSA, ...; the cache is cropped back to N tokens before each) after one untimed warm-up each, and
the median is reported. Device: CUDA when available (LiSA layers then use the Triton kernels,
``kernel="auto"``), else CPU (PyTorch path of LiSA layers; base attention is sdpa in both cases).

Memory (the warm-up decode of each variant, measured alone):

* ``cache MB``: bytes of the KV-cache tensors after the prefill (measured), next to the analytic
  ratio of ``lisa_peft.evaluation.memory.model_kv_cache_bytes``;
* ``decode peak MB``: extra memory at the peak of the ``--steps`` decode steps over what was in use
  before them (cache growth and temporaries). On CUDA: ``torch.cuda.max_memory_allocated`` (after
  ``reset_peak_memory_stats``) minus ``memory_allocated`` before. On CPU: the peak resident set size
  ``VmHWM`` (reset by writing 5 to ``/proc/self/clear_refs``) minus ``VmRSS`` before, after
  ``gc.collect()`` and glibc ``malloc_trim(0)``; this is the OS view and includes allocator slack,
  so read it as a rough number (``n/a`` where /proc or glibc is missing).

On a CPU shared with other jobs, pass ``--threads 1``: when more OpenMP threads are asked for than
cores are free, every op waits at its thread barrier (on a 2-core machine with another job running,
one decode step of SmolLM2-135M took about 0.75 s with 2 threads and 0.06 s with 1).

Results go to ``benchmarks/results/decode_speed-<device>-<time>.json``; the analytic per-layer cost
table of ``benchmarks/analytic_costs.py`` is printed after the measurements.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.analytic_costs import table  # noqa: E402
from benchmarks.costs import MODELS, ModelShape  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MB = 1e6


# ---------------------------------------------------------------------- memory probes
class _CpuPeak:
    """Peak RSS increase of a code region on Linux (see module docstring); None where unsupported."""

    def __init__(self) -> None:
        try:
            self._libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self._libc = None

    @staticmethod
    def _status(field: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def start(self) -> int | None:
        gc.collect()
        if self._libc is not None:
            self._libc.malloc_trim(0)
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return None
        return self._status("VmRSS")

    def stop(self, start: int | None) -> float | None:
        peak = self._status("VmHWM")
        return None if start is None or peak is None else (peak - start) / MB


def _start_peak(device: torch.device, cpu_peak: _CpuPeak):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return cpu_peak.start()


def _stop_peak(device: torch.device, cpu_peak: _CpuPeak, start) -> float | None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated(device) - start) / MB
    return cpu_peak.stop(start)


# ---------------------------------------------------------------------- model and cache
def parse_layers(spec: str, num_layers: int) -> list[int]:
    """'0.4' = the last 40 % of the layers; '18-29' = a range; '18,20,22' = a list."""
    if "-" in spec:
        first, last = (int(x) for x in spec.split("-"))
        return list(range(first, last + 1))
    if "," in spec or spec.isdigit():
        return sorted(int(x) for x in spec.split(","))
    fraction = float(spec)
    count = max(1, round(fraction * num_layers))
    return list(range(num_layers - count, num_layers))


def cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def crop_to(cache, n: int) -> None:
    """Drop the tokens after the first `n` (transformers 5 `crop` takes minus the number to remove)."""
    extra = cache.get_seq_length() - n
    if extra > 0:
        cache.crop(-extra)


@torch.no_grad()
def prefill(model, ids: torch.Tensor, chunk: int):
    """KV cache of `ids` [1, N], built `chunk` tokens at a time; returns (cache, last logits)."""
    from lisa_peft.tuners.lisa.transformers_compat import DynamicCache, cache_kwargs

    cache = DynamicCache()
    logits = None
    for start in range(0, ids.shape[1], chunk):
        out = model(ids[:, start : start + chunk], **cache_kwargs(cache), use_cache=True)
        logits = out.logits[:, -1:]
    return cache, logits


@torch.no_grad()
def decode(model, cache, logits: torch.Tensor, steps: int, device: torch.device) -> float:
    """Seconds for `steps` greedy decode steps from `cache` (appends to it)."""
    from lisa_peft.tuners.lisa.transformers_compat import cache_kwargs

    token = logits.argmax(-1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        logits = model(token, **cache_kwargs(cache), use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "n/a" if x is None else format(x, spec)


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="path or Hub id; default: the demo model (SmolLM2-135M)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per variant (median reported)")
    parser.add_argument("--layers", default="0.4", help="LiSA layers: fraction of the last layers, 'a-b' or 'a,b,c'")
    parser.add_argument("--kernel", default="auto", choices=["auto", "triton", "torch"], help="LisaConfig.kernel")
    parser.add_argument("--dtype", default=None, help="float32 / float16 / bfloat16 (default: bf16 on CUDA, fp32 CPU)")
    parser.add_argument("--prefill-chunk", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    parser.add_argument("--quick", action="store_true", help="contexts 256 512, 4 steps, 2 repeats")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    if args.quick:
        args.contexts, args.steps, args.repeats = [256, 512], 4, 2
    if args.threads:
        torch.set_num_threads(args.threads)

    from peft import get_peft_model

    from lisa_peft import LisaConfig
    from lisa_peft.evaluation.memory import model_kv_cache_bytes
    from lisa_peft.pipeline.base_models import load_base_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    base, _ = load_base_model(args.model, dtype=dtype)
    config = base.config
    layers = parse_layers(args.layers, config.num_hidden_layers)
    # LiSA weights (and so the cached Kr) in the model dtype: the KV-cache comparison is then like for like.
    lisa_config = LisaConfig(lisa_layers=layers, kernel=args.kernel, lisa_dtype=dtype_name)
    model = get_peft_model(base, lisa_config).to(device).eval()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shape = ModelShape(
        name=str(args.model or "SmolLM2-135M"), d=config.hidden_size, H=config.num_attention_heads,
        G=config.num_key_value_heads, D=head_dim, layers=config.num_hidden_layers,
    )
    uses_triton = device.type == "cuda" and args.kernel in ("auto", "triton")
    path = "Triton kernels" if uses_triton or args.kernel == "triton" else "PyTorch path"
    print(f"model {shape.name}: {shape.layers} layers, d={shape.d}, H={shape.H}, G={shape.G}, D={shape.D}; "
          f"LiSA layers {layers[0]}..{layers[-1]} ({len(layers)}), r={lisa_config.r}, F={lisa_config.ffn_hidden}")
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.machine()}"
          f", {torch.get_num_threads()} threads), dtype {dtype_name}, LiSA attention: {path} (kernel={args.kernel}); "
          f"batch 1, {args.steps} decode steps x {args.repeats} interleaved repeats (median), "
          f"prefill chunk {args.prefill_chunk}\n")

    cpu_peak = _CpuPeak()
    generator = torch.Generator().manual_seed(0)
    rows = []
    for n in args.contexts:
        ids = torch.randint(3, config.vocab_size, (1, n), generator=generator).to(device)
        variants = {}
        for name in ("base", "lisa"):
            t0 = time.perf_counter()
            if name == "base":
                with model.disable_adapter():
                    cache, logits = prefill(model, ids, args.prefill_chunk)
            else:
                cache, logits = prefill(model, ids, args.prefill_chunk)
            prefill_s = time.perf_counter() - t0
            variants[name] = {"cache": cache, "logits": logits, "prefill_s": prefill_s,
                              "cache_bytes": cache_bytes(cache), "times": []}
        # Warm-up (untimed) of each variant alone, with the memory probe; then interleaved timed repeats.
        for repeat in range(args.repeats + 1):
            for name, var in variants.items():
                crop_to(var["cache"], n)
                start = _start_peak(device, cpu_peak) if repeat == 0 else None
                if name == "base":
                    with model.disable_adapter():
                        seconds = decode(model, var["cache"], var["logits"], args.steps, device)
                else:
                    seconds = decode(model, var["cache"], var["logits"], args.steps, device)
                if repeat == 0:
                    var["decode_peak_mb"] = _stop_peak(device, cpu_peak, start)
                else:
                    var["times"].append(seconds)
        analytic = model_kv_cache_bytes(model, batch_size=1, seq_len=n, dtype=dtype)
        row = {"context": n, "analytic_kv_bytes": {"base": analytic.base, "lisa": analytic.lisa}}
        for name, var in variants.items():
            median = statistics.median(var["times"])
            row[name] = {
                "tokens_per_s": args.steps / median,
                "step_ms_median": 1e3 * median / args.steps,
                "times_s": var["times"],
                "prefill_s": var["prefill_s"],
                "cache_bytes": var["cache_bytes"],
                "decode_peak_mb": var["decode_peak_mb"],
            }
        rows.append(row)
        del variants
        gc.collect()
        b, li = row["base"], row["lisa"]
        print(f"  N={n}: base {b['tokens_per_s']:.2f} tok/s, LiSA {li['tokens_per_s']:.2f} tok/s "
              f"(prefill {b['prefill_s']:.1f} s / {li['prefill_s']:.1f} s)", flush=True)

    peak_kind = "cuda max_memory_allocated" if device.type == "cuda" else "RSS high-water mark (VmHWM), rough"
    print(f"\n| N | base tok/s | LiSA tok/s | LiSA/base tok/s | base cache MB | LiSA cache MB | cache ratio "
          f"(measured / model_kv_cache_bytes) | base decode peak MB | LiSA decode peak MB |  <- peak: {peak_kind}")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        b, li, an = row["base"], row["lisa"], row["analytic_kv_bytes"]
        print(f"| {row['context']} | {b['tokens_per_s']:.2f} | {li['tokens_per_s']:.2f} | "
              f"{li['tokens_per_s'] / b['tokens_per_s']:.3f} | {b['cache_bytes'] / MB:.1f} | "
              f"{li['cache_bytes'] / MB:.1f} | {li['cache_bytes'] / b['cache_bytes']:.3f} / "
              f"{an['lisa'] / an['base']:.3f} | {_fmt(b['decode_peak_mb'])} | {_fmt(li['decode_peak_mb'])} |")

    print("\nAnalytic per-layer decode cost (benchmarks/analytic_costs.py; 2-byte elements):\n")
    print(table((shape, *MODELS), args.contexts))

    out = args.out or RESULTS_DIR / f"decode_speed-{device.type}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": shape.name, "layers": layers, "r": lisa_config.r, "ffn_hidden": lisa_config.ffn_hidden,
        "device": str(device), "dtype": dtype_name, "kernel": args.kernel, "lisa_attention": path,
        "threads": torch.get_num_threads(), "steps": args.steps, "repeats": args.repeats,
        "prefill_chunk": args.prefill_chunk, "peak_memory": peak_kind, "torch": torch.__version__,
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
