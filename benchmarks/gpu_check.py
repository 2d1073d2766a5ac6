"""The Python stages of the one-command GPU check (``scripts/gpu_check.sh``), each writing one JSON file.

Usage: ``python benchmarks/gpu_check.py STAGE ... --out FILE`` with STAGE one of

* ``skip --reason TEXT``: the JSON of a check that did not run (``{"skipped": TEXT, ...}``);
* ``env``: versions (Python, torch, CUDA, Triton, transformers, PEFT, lisa-peft), the GPU, and whether the
  installed packages meet setup.cfg's requirements and the ``triton`` extra;
* ``timings [--shape llama3-8b] [--tokens 1024 4096] [--new-tokens 32] [--repeats 5]``: prefill and decode
  of one prompt of random token ids through a LLaMA-shaped model with random weights (built from a
  ``transformers.LlamaConfig`` on the device: nothing is downloaded), LiSA in the last ``--lisa-fraction``
  of the layers, for the variants ``triton`` (``set_kernel_mode(model, "triton")``), ``torch`` (the PyTorch
  path), ``base`` (``disable_adapter()``) and ``triton-chunk=0`` (the kernels with the prefill in one pass
  instead of the library's ``prefill_chunk_size``). The prefill and the decode loop are
  ``benchmarks/decode_speed.py``'s ``prefill`` and ``decode``; one untimed warm-up per variant (Triton
  compiles, peak memory and the kernel calls are recorded there), then ``--repeats`` timed rounds in
  alternating variant order (as ``benchmarks/prefill.py``). Each timing is summarised as median, min, max
  and spread = (max - min) / median;
* ``train [--shape llama3-8b] [--seq-len 2048] [--steps 4]``: AdamW steps of the LiSA weights only on the
  bf16 base (LiSA weights by the PEFT rule, float32), ``labels = input_ids``; losses, gradient norms,
  step time and peak memory;
* ``report --work DIR``: the one result file, made of the stage files and logs that the shell script left
  in DIR (``stages.tsv``: name, exit code (-1: not run), seconds, budget; ``NAME.json``; ``NAME.log``).

Module-level imports are the standard library only: ``skip`` and ``report`` run on a Python without torch.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import json
import math
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
CHECK = "lisa-peft gpu_check"
MB = 1e6
# Random-weight LLaMA shapes (public configurations); "tiny" is for CPU tests of this module.
SHAPES: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=96, max_position_embeddings=256),
}
VARIANTS = ("triton", "torch", "base", "triton-chunk=0")
KERNEL_ENTRY_POINTS = ("anchor_attention", "lisa_prefill", "lisa_decode")
LOG_TAIL_CHARS = 3000


# ---------------------------------------------------------------------- small helpers
def summarize(values: Sequence[float]) -> dict[str, float | int]:
    """Median, min, max and spread = (max - min) / median of repeated measurements (seconds)."""
    if not values:
        raise ValueError("summarize needs at least one measurement")
    median = statistics.median(values)
    return {"median": median, "min": min(values), "max": max(values), "n": len(values),
            "spread": (max(values) - min(values)) / median if median > 0 else 0.0}


def write_json(path: Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return path


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def skip_payload(reason: str) -> dict:
    """The result of a check that did not run: `skipped` holds the reason, no stage ran."""
    return {"check": CHECK, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "skipped": reason, "passed": None,
            "host": {"python": platform.python_version(), "machine": platform.machine()},
            "git_commit": _git_commit(), "stages": {}}


def parse_variant(name: str) -> tuple[str, int | None]:
    """'triton' / 'torch' / 'auto' / 'base', optionally '-chunk=N' (LiSA only): (kernel, prefill chunk or None)."""
    kernel, sep, chunk = name.partition("-chunk=")
    if kernel not in ("triton", "torch", "auto", "base") or (sep and (kernel == "base" or not chunk.isdigit())):
        raise ValueError(f"unknown variant {name!r}: use triton, torch, auto or base; LiSA variants may add "
                         "-chunk=N (prefill_chunk_size, 0 = one pass), e.g. triton-chunk=0")
    return kernel, int(chunk) if sep else None


# ---------------------------------------------------------------------- env
def requirement_problems(setup_cfg: Path = ROOT / "setup.cfg", extras: Sequence[str] = ("triton",)) -> list[str]:
    """Each requirement of setup.cfg's install_requires (and `extras`) that the installed packages miss, as
    'name: found X, setup.cfg asks SPEC'. Needs `packaging` (pip's dependency, on every Python with pip)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    parser = configparser.ConfigParser()
    parser.read(setup_cfg)
    lines = parser["options"]["install_requires"].splitlines()
    for extra in extras:
        lines += parser["options.extras_require"][extra].splitlines()
    problems = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        try:
            found = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{requirement.name}: not installed, setup.cfg asks {requirement}")
            continue
        if requirement.specifier and not requirement.specifier.contains(found, prereleases=True):
            problems.append(f"{requirement.name}: found {found}, setup.cfg asks {requirement}")
    return problems


def environment() -> dict:
    """Versions, the GPU and the requirement check; `passed` when CUDA, Triton and lisa-peft are usable."""
    import torch

    payload: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable,
                               "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "transformers", "peft", "accelerate"):
        try:
            payload[name] = __import__(name).__version__
        except Exception as error:  # noqa: BLE001 (recorded, the check goes on)
            payload[name] = f"unavailable: {type(error).__name__}: {error}"
    errors = []
    try:
        import lisa_kernels
        import lisa_peft
        from lisa_peft.version import __version__

        payload["lisa_peft"] = __version__
        payload["lisa_peft_path"] = str(Path(lisa_peft.__file__).parent)
        payload["triton_available"] = lisa_kernels.triton_available()
    except Exception as error:  # noqa: BLE001
        errors.append(f"import lisa_peft / lisa_kernels failed: {type(error).__name__}: {error}")
        payload["triton_available"] = False
    payload["cuda_available"] = torch.cuda.is_available()
    if payload["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        payload["gpu"] = {"name": props.name, "count": torch.cuda.device_count(),
                          "capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count,
                          "memory_gib": round(props.total_memory / 2**30, 1)}
    else:
        errors.append("torch.cuda.is_available() is False: this torch has no CUDA support or sees no device")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        payload["driver"] = smi.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        payload["driver"] = None
    if payload.get("lisa_peft") and not payload["triton_available"]:
        errors.append("lisa_kernels.triton_available() is False: install triton (pip install 'lisa-peft[triton]')")
    try:
        payload["requirement_problems"] = requirement_problems()
    except Exception as error:  # noqa: BLE001
        payload["requirement_problems"] = [f"could not check setup.cfg's requirements: {error}"]
    if payload["requirement_problems"]:
        errors.append("installed packages do not meet setup.cfg (see requirement_problems): carry the locked "
                      "wheels, `bash scripts/gpu_check.sh --fetch-wheels` on a machine with PyPI access")
    payload["errors"] = errors
    payload["passed"] = not errors
    return payload


# ---------------------------------------------------------------------- model
def build_model(shape: str = "llama3-8b", lisa_fraction: float = 0.5, device: str = "cuda",
                dtype: str = "bfloat16", lisa_dtype: str | None = None, seed: int = 0):
    """A LlamaForCausalLM of `shape` with random weights, built on `device` in `dtype` (sdpa attention), with
    LiSA (identity init) in the last `lisa_fraction` of its layers; a PeftModel in eval mode."""
    import torch
    import transformers
    from peft import get_peft_model

    from benchmarks.decode_speed import parse_layers
    from lisa_peft import LisaConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: use one of {sorted(SHAPES)}")
    config = transformers.LlamaConfig(**SHAPES[shape])
    torch.manual_seed(seed)
    with torch.device(device):
        base = transformers.LlamaForCausalLM._from_config(config, dtype=getattr(torch, dtype),
                                                          attn_implementation="sdpa")
    layers = parse_layers(str(lisa_fraction), config.num_hidden_layers)
    return get_peft_model(base, LisaConfig(lisa_layers=layers, lisa_dtype=lisa_dtype)).eval()


@contextlib.contextmanager
def use_variant(model, name: str) -> Iterator[None]:
    """Run the body as variant `name` (see `parse_variant`); the adapter's kernel mode and chunk size are
    restored afterwards."""
    from lisa_peft.tuners.lisa.chunked import set_prefill_chunk_size
    from lisa_peft.tuners.lisa.model import set_kernel_mode

    kernel, chunk = parse_variant(name)
    if kernel == "base":
        with model.disable_adapter():
            yield
        return
    config = model.peft_config[model.active_adapter]
    old_kernel, old_chunk = config.kernel, config.prefill_chunk_size
    set_kernel_mode(model, kernel)
    if chunk is not None:
        set_prefill_chunk_size(model, chunk)
    try:
        yield
    finally:
        set_kernel_mode(model, old_kernel)
        set_prefill_chunk_size(model, old_chunk)


@contextlib.contextmanager
def count_kernel_calls() -> Iterator[dict[str, int]]:
    """Count the calls of the Triton entry points of `lisa_kernels` (what the dispatch calls) in the body."""
    import lisa_kernels

    counts = dict.fromkeys(KERNEL_ENTRY_POINTS, 0)
    originals = {name: getattr(lisa_kernels, name) for name in KERNEL_ENTRY_POINTS}

    def counted(name: str, function):
        def call(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)

        return call

    for name, function in originals.items():
        setattr(lisa_kernels, name, counted(name, function))
    try:
        yield counts
    finally:
        for name, function in originals.items():
            setattr(lisa_kernels, name, function)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------- timings
def _prefill_and_decode(model, ids, new_tokens: int):
    """One prompt: (prefill seconds, decode seconds, last prefill logits [1, 1, V] float32)."""
    from benchmarks.decode_speed import decode, prefill

    device = ids.device
    _sync(device)
    start = time.perf_counter()
    cache, logits = prefill(model, ids, ids.shape[1])  # one model call; LiSA's own chunking applies inside
    _sync(device)
    prefill_s = time.perf_counter() - start
    decode_s = decode(model, cache, logits, new_tokens, device)
    return prefill_s, decode_s, logits.float()


def time_variants(model, tokens: int, new_tokens: int, repeats: int, variants: Sequence[str] = VARIANTS,
                  seed: int = 0) -> dict:
    """Prefill of `tokens` random ids [1, tokens] and `new_tokens` greedy decode steps, per variant: one untimed
    warm-up (peak memory, kernel calls, last logits), then `repeats` timed rounds in alternating order."""
    import torch

    from benchmarks.decode_speed import _CpuPeak, _start_peak, _stop_peak

    for name in variants:
        parse_variant(name)
    if repeats < 1 or new_tokens < 2 or tokens < 1:
        raise ValueError(f"need repeats >= 1, new_tokens >= 2, tokens >= 1; got {repeats}, {new_tokens}, {tokens}")
    device = next(model.parameters()).device
    ids = torch.randint(3, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(device)
    cpu_peak = _CpuPeak()
    rows: dict[str, dict] = {}
    last_logits = {}
    problems = []
    for name in variants:  # a variant that fails here (Triton compile error, out of memory) is recorded and left out
        try:
            with use_variant(model, name), count_kernel_calls() as calls:
                start = _start_peak(device, cpu_peak)
                _, _, logits = _prefill_and_decode(model, ids, new_tokens)
                peak = _stop_peak(device, cpu_peak, start)
        except Exception as error:  # noqa: BLE001
            rows[name] = {"error": f"{type(error).__name__}: {error}"}
            problems.append(f"{name}: {rows[name]['error']}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        last_logits[name] = logits
        rows[name] = {"kernel_calls": dict(calls), "peak_mb": peak, "logits_finite": bool(torch.isfinite(logits).all()),
                      "prefill_s": [], "decode_s": []}
    ran = [name for name in variants if name in last_logits]
    for round_ in range(repeats):
        for name in ran if round_ % 2 == 0 else ran[::-1]:
            with use_variant(model, name):
                prefill_s, decode_s, _ = _prefill_and_decode(model, ids, new_tokens)
            rows[name]["prefill_s"].append(prefill_s)
            rows[name]["decode_s"].append(decode_s)
    for name in ran:
        row = rows[name]
        row["prefill_s"], row["decode_s"] = summarize(row["prefill_s"]), summarize(row["decode_s"])
        row["decode_tokens_per_s"] = new_tokens / row["decode_s"]["median"]
        kernel, _ = parse_variant(name)
        ran_kernels = row["kernel_calls"]["lisa_prefill"] > 0 and row["kernel_calls"]["lisa_decode"] > 0
        if not row["logits_finite"]:
            problems.append(f"{name}: non-finite logits")
        if kernel == "triton" and not ran_kernels:
            problems.append(f"{name}: the Triton prefill/decode kernels were not called ({row['kernel_calls']})")
        if kernel in ("torch", "base") and any(row["kernel_calls"].values()):
            problems.append(f"{name}: Triton kernels were called on the PyTorch path ({row['kernel_calls']})")
    if "base" in ran:
        base = rows["base"]
        for name in ran:
            rows[name]["prefill_vs_base"] = rows[name]["prefill_s"]["median"] / base["prefill_s"]["median"]
            rows[name]["decode_tokens_per_s_vs_base"] = rows[name]["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    result: dict[str, Any] = {"tokens": tokens, "new_tokens": new_tokens, "repeats": repeats, "variants": rows}
    lisa = [name for name in ran if parse_variant(name)[0] != "base"]
    if "torch" in lisa and len(lisa) >= 2:  # kernels vs PyTorch path on the same model: the last prefill logits
        ref = last_logits["torch"]
        others = [name for name in lisa if name != "torch"]
        result["max_abs_diff_vs_torch"] = {name: float((last_logits[name] - ref).abs().max()) for name in others}
        result["top1_agrees_with_torch"] = {
            name: bool((last_logits[name].argmax(-1) == ref.argmax(-1)).all()) for name in others}
    result["problems"] = problems
    result["passed"] = not problems
    return result


def timings_stage(shape: str, tokens: Sequence[int], new_tokens: int, repeats: int, variants: Sequence[str],
                  lisa_fraction: float, device: str | None = None) -> dict:
    """`time_variants` for every prompt length on one model (bf16 on CUDA, float32 on CPU)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if device == "cuda" else "float32"
    start = time.perf_counter()
    # LiSA weights in the model dtype, as decode_speed.py: the cache comparison with the base is like for like.
    model = build_model(shape, lisa_fraction, device, dtype, lisa_dtype=dtype)
    config = model.peft_config[model.active_adapter]
    payload: dict[str, Any] = {"shape": shape, "model": SHAPES[shape], "device": device, "dtype": dtype,
                               "lisa_layers": config.lisa_layers, "r": config.r,
                               "prefill_chunk_size": config.prefill_chunk_size, "build_s": time.perf_counter() - start,
                               "rows": []}
    print(f"[timings] {shape} on {device} ({dtype}), LiSA layers {config.lisa_layers}, built in "
          f"{payload['build_s']:.1f} s", flush=True)
    for n in tokens:
        row = time_variants(model, n, new_tokens, repeats, variants)
        payload["rows"].append(row)
        for name, var in row["variants"].items():
            if "error" in var:
                print(f"[timings] N={n} {name:>15}: FAILED: {var['error']}", flush=True)
                continue
            print(f"[timings] N={n} {name:>15}: prefill {1e3 * var['prefill_s']['median']:8.1f} ms "
                  f"(spread {var['prefill_s']['spread']:.0%}), decode {var['decode_tokens_per_s']:7.1f} tok/s "
                  f"(spread {var['decode_s']['spread']:.0%}), kernel calls {var['kernel_calls']}", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    payload["problems"] = [f"N={row['tokens']}: {p}" for row in payload["rows"] for p in row["problems"]]
    payload["passed"] = not payload["problems"]
    return payload


# ---------------------------------------------------------------------- train
def train_steps(model, seq_len: int, steps: int, lr: float = 1e-4, seed: int = 0) -> dict:
    """`steps` AdamW steps of the trainable (LiSA) weights on random ids [1, seq_len] with labels = ids:
    losses, gradient norms, step times (median of the steps after the first), peak memory, weight change."""
    import torch

    from benchmarks.decode_speed import _CpuPeak, _start_peak, _stop_peak

    if steps < 2:
        raise ValueError(f"need at least 2 steps (the first one is a warm-up), got {steps}")
    device = next(model.parameters()).device
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters: expected LiSA weights")
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    ids = torch.randint(3, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(device)
    cpu_peak = _CpuPeak()
    start_mem = _start_peak(device, cpu_peak)
    losses, grad_norms, times = [], [], []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        grad_norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in trainable]))))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - start)
        losses.append(loss.detach().item())
    step_peak = _stop_peak(device, cpu_peak, start_mem)
    change = max(float((p.detach() - b).abs().max()) for p, b in zip(trainable, before, strict=True))
    model.eval()
    problems = []
    if not all(math.isfinite(x) for x in losses + grad_norms):
        problems.append(f"non-finite loss or gradient norm: losses {losses}, gradient norms {grad_norms}")
    if not change > 0:
        problems.append("the LiSA weights did not change")
    payload = {"seq_len": seq_len, "steps": steps, "lr": lr, "losses": losses, "grad_norms": grad_norms,
               "step_s": summarize(times[1:]), "first_step_s": times[0], "step_peak_mb": step_peak,
               "max_weight_change": change, "trainable_params": sum(p.numel() for p in trainable),
               "trainable_dtypes": sorted({str(p.dtype) for p in trainable})}
    if device.type == "cuda":
        payload["peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / MB
    payload["problems"] = problems
    payload["passed"] = not problems
    return payload


def train_stage(shape: str, seq_len: int, steps: int, lisa_fraction: float, device: str | None = None) -> dict:
    """`train_steps` on a random-weight model: bf16 base on CUDA (float32 on CPU), LiSA weights by the PEFT rule."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if device == "cuda" else "float32"
    model = build_model(shape, lisa_fraction, device, dtype)
    payload = {"shape": shape, "device": device, "dtype": dtype, **train_steps(model, seq_len, steps)}
    peak = payload.get("peak_allocated_mb")
    memory = f"peak {peak:.0f} MB allocated" if peak is not None else f"step peak {payload['step_peak_mb']} MB (RSS)"
    print(f"[train] {shape} on {device} ({dtype}), seq {seq_len}: losses {[round(x, 4) for x in payload['losses']]}, "
          f"step {payload['step_s']['median']:.3f} s, {memory}, "
          f"{'passed' if payload['passed'] else 'FAILED: ' + '; '.join(payload['problems'])}", flush=True)
    return payload


# ---------------------------------------------------------------------- report
def pytest_counts(log: str) -> dict[str, int]:
    """Counts of pytest's closing line ('3 passed, 1 failed, 2 skipped in 4.5s'); {} when there is none."""
    for line in reversed(log.splitlines()):
        if re.search(r"\b(passed|failed|errors?|skipped|no tests ran)\b.* in [\d.]+s", line):
            return {("error" if word.startswith("error") else word): int(n)
                    for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)",
                                              line)}
    return {}


def stage_result(name: str, rc: int, seconds: float, budget: float, work: Path) -> dict:
    """One stage's entry: exit code, time, its JSON (if written) and log tail; `passed` when the command
    exited 0 and its JSON (or, for the kernel tests, pytest's counts) says so."""
    log_path, json_path = work / f"{name}.log", work / f"{name}.json"
    log = log_path.read_text(errors="replace") if log_path.exists() else ""
    entry: dict[str, Any] = {"rc": rc, "timed_out": rc in (124, 137), "seconds": seconds, "budget_s": budget}
    passed = rc == 0
    if json_path.exists():
        entry["results"] = json.loads(json_path.read_text())
        passed = passed and entry["results"].get("passed") is True
    elif name == "kernel_tests":
        entry["pytest"] = counts = pytest_counts(log)
        passed = passed and counts.get("passed", 0) > 0 and not counts.get("failed") and not counts.get("error")
    else:
        passed = False  # every other stage writes its JSON
    if entry["timed_out"]:
        entry["error"] = f"ran past its budget of {budget:.0f} s and was stopped"
    elif rc == -1:
        entry["error"] = "not run: no time left of the check's total budget (GPU_CHECK_TOTAL_S)"
    entry["passed"] = passed
    entry["log_tail"] = log[-LOG_TAIL_CHARS:]
    return entry


def report(work: Path) -> dict:
    """The whole check from the shell script's stage table `work/stages.tsv` (name, rc, seconds, budget)."""
    work = Path(work)
    payload = skip_payload("")
    payload["skipped"] = None
    rows = [line.split("\t") for line in (work / "stages.tsv").read_text().splitlines() if line.strip()]
    for name, rc, seconds, budget in rows:
        payload["stages"][name] = stage_result(name, int(rc), float(seconds), float(budget), work)
    env = payload["stages"].get("env", {}).get("results", {})
    payload["versions"] = {key: env.get(key) for key in ("python", "torch", "cuda", "triton", "transformers", "peft",
                                                          "accelerate", "lisa_peft", "driver")}
    payload["gpu"] = env.get("gpu")
    payload["budget_s"] = {name: stage["budget_s"] for name, stage in payload["stages"].items()}
    payload["total_s"] = sum(stage["seconds"] for stage in payload["stages"].values())
    payload["passed"] = bool(payload["stages"]) and all(stage["passed"] for stage in payload["stages"].values())
    return payload


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    skip = sub.add_parser("skip", help="write the JSON of a check that did not run")
    skip.add_argument("--reason", required=True)
    sub.add_parser("env", help="versions, GPU, requirements")
    for name in ("timings", "train"):
        stage = sub.add_parser(name)
        stage.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
        stage.add_argument("--lisa-fraction", type=float, default=0.5, help="LiSA in the last fraction of the layers")
        stage.add_argument("--device", default=None, help="default: cuda when available, else cpu")
        if name == "timings":
            stage.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
            stage.add_argument("--new-tokens", type=int, default=32)
            stage.add_argument("--repeats", type=int, default=5)
            stage.add_argument("--variants", nargs="+", default=list(VARIANTS))
        else:
            stage.add_argument("--seq-len", type=int, default=2048)
            stage.add_argument("--steps", type=int, default=4)
    rep = sub.add_parser("report", help="one JSON of all stages")
    rep.add_argument("--work", type=Path, required=True)
    for each in sub.choices.values():
        each.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    if args.stage == "skip":
        payload = skip_payload(args.reason)
        print(f"[gpu_check] skipped: {args.reason}")
    elif args.stage == "env":
        payload = environment()
        for key in ("python", "torch", "cuda", "triton", "transformers", "peft", "lisa_peft", "gpu", "driver"):
            print(f"[env] {key}: {payload.get(key)}")
        for error in payload["errors"]:
            print(f"[env] problem: {error}")
        for problem in payload["requirement_problems"]:
            print(f"[env]   {problem}")
    elif args.stage == "timings":
        for name in args.variants:
            parse_variant(name)  # a bad name fails before the model is built
        payload = timings_stage(args.shape, args.tokens, args.new_tokens, args.repeats, args.variants,
                                args.lisa_fraction, args.device)
    elif args.stage == "train":
        payload = train_stage(args.shape, args.seq_len, args.steps, args.lisa_fraction, args.device)
    else:
        payload = report(args.work)
        for name, stage in payload["stages"].items():
            state = "passed" if stage["passed"] else ("TIMED OUT" if stage["timed_out"] else "FAILED")
            print(f"[gpu_check] {name:>12}: {state} ({stage['seconds']:.0f} s of {stage['budget_s']:.0f} s)")
        print(f"[gpu_check] overall: {'passed' if payload['passed'] else 'FAILED'}")
    write_json(args.out, payload)
    print(f"[gpu_check] wrote {args.out}")
    return 0 if args.stage == "skip" or payload.get("passed") else 1


if __name__ == "__main__":
    raise SystemExit(main())
