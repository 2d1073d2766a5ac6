"""The fidelity/saving frontier: layer fraction x rank of the low-rank Q/K, one protocol for every cell.

For SmolLM2-135M-Instruct (the embedded demo model):

1. sample the training windows from the base model (`lisa_peft.pipeline.sampled_corpus`), calibrate on the first
   `--calibration` of them (their first 128 tokens);
2. run the layer probe of ``lisa_layers="auto"`` once (`--probe-r`), so that the layer sets are nested
   (the 50 % set is inside the 67 % set, which is inside the 80 % set) and the cells differ only in
   what they are meant to differ in;
3. per cell (fraction, r): `lisa_peft.convert` with those layers (calibrated init + `--layerwise-steps`),
   then `--steps` end-to-end distillation steps against the base model's cached top-64 log-probabilities
   (batch 4 x 256 tokens, AdamW at `--lr`, 10 warm-up steps, cosine), the loss of the recipes;
4. per cell: KL(base || LiSA) and the perplexity ratio on two held-out texts of other sources that the run
   never trains on (the pydoc topics, embedded; tinyshakespeare's last 10 % from `--heldout-dir` or
   ``$LISA_PEFT_HELDOUT_DIR``), ARC-Easy acc_norm base vs LiSA (`--arc FILE`, lm-eval's conventions),
   the KV-cache bytes per token, the parameter bytes of the compact model (`merge_and_unload`);
5. ``--speed``: per cell, greedy `generate` tokens/s of the LiSA model against the same model with its
   adapter disabled, interleaved repeats (median and spread). Run it alone on the machine.
6. ``--report``: the table (markdown) and the plot (saving on x, fidelity on y, one line per fraction).
Ablations change one thing against the frontier's cells (`VARIANT_DEFAULTS`); their rows are marked, shown as
their own table rows and as black markers in the plot:
* ``--rank-allocation sensitivity``: `LisaConfig(rank_allocation="sensitivity")`, the same rank budget shared out
  by each layer's measured output KL inside `lisa_peft.convert`;
* ``--layer-search greedy``: the layers of `lisa_peft.pipeline.convert.greedy_layers` (added one at a time given
  those already chosen, over the probe's fitted layers) instead of the least sensitive ones alone;
* ``--distill sequence``: the end-to-end stage on cross-entropy of the base model's own generations
  (sequence-level distillation) instead of the top-64 KL;
* ``--steps N`` / ``--lr X``: the length and the learning rate of the end-to-end stage.

    python benchmarks/frontier.py --heldout-dir DIR --arc DIR/arc_easy_dev.jsonl --speed --report

One command runs every stage; cells already in the results file (same protocol) are skipped, so an
interrupted run continues where it stopped. Results: benchmarks/results/frontier.jsonl (one JSON line per
cell), the table on stdout and in benchmarks/results/frontier.md, the plot in
benchmarks/results/frontier.png (`--plot PATH` to put it elsewhere).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.fidelity import HELDOUT_DIR_ENV, RESULTS, held_out_sets  # noqa: E402

PROTOCOL_KEYS = ("calibration", "layerwise_steps", "probe_r", "arc_limit", "sampled")
PROBE_KEYS = ("calibration", "probe_r", "sampled")  # what the layer probe (and the greedy search) depend on
# What an ablation row changes against the frontier's own cells (missing from a row: the default).
VARIANT_DEFAULTS = {"allocation": "uniform", "search": "single", "distill": "topk", "steps": 30, "lr": 5e-4}
VARIANT_CHOICES = {"allocation": ("uniform", "sensitivity"), "search": ("single", "greedy"),
                   "distill": ("topk", "sequence")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.67, 0.8])
    parser.add_argument("--ranks", type=int, nargs="+", default=[12, 16, 24, 32])
    parser.add_argument("--calibration", type=int, default=64, help="calibration windows (first 128 tokens)")
    parser.add_argument("--sampled", type=int, default=128, help="sampled training windows of 256 tokens")
    parser.add_argument("--layerwise-steps", type=int, default=200)
    parser.add_argument("--steps", type=int, default=VARIANT_DEFAULTS["steps"],
                        help="end-to-end distillation steps (batch 4)")
    parser.add_argument("--lr", type=float, default=VARIANT_DEFAULTS["lr"], help="end-to-end learning rate")
    parser.add_argument("--distill", choices=VARIANT_CHOICES["distill"], default=VARIANT_DEFAULTS["distill"],
                        help="end-to-end loss: top-64 KL to the base model, or cross-entropy on the base model's "
                        "own generations (sequence-level distillation)")
    parser.add_argument("--layer-search", dest="search", choices=VARIANT_CHOICES["search"],
                        default=VARIANT_DEFAULTS["search"],
                        help="layer choice: each layer scored alone, or greedy given the layers already chosen")
    parser.add_argument("--probe-r", type=int, default=16, help="rank the shared layer probe runs at")
    parser.add_argument("--heldout-dir", default=None, help=f"folder with tinyshakespeare.txt (or ${HELDOUT_DIR_ENV})")
    parser.add_argument("--arc", default=None, help="ARC-style JSON-lines file for zero-shot acc_norm")
    parser.add_argument("--arc-limit", type=int, default=300)
    parser.add_argument("--rank-allocation", dest="allocation", choices=VARIANT_CHOICES["allocation"],
                        default=VARIANT_DEFAULTS["allocation"],
                        help="LisaConfig.rank_allocation of the cells (sensitivity: the per-layer rank ablation)")
    parser.add_argument("--ablations", nargs="+", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="more variants to run in the same process, each against the defaults: "
                        f"keys {', '.join(VARIANT_DEFAULTS)} (e.g. search=greedy distill=sequence lr=0.002 steps=90)")
    parser.add_argument("--speed", action="store_true", help="measure decode tokens/s ratios (run alone)")
    parser.add_argument("--speed-only", action="store_true", help="skip the fidelity cells")
    parser.add_argument("--report", action="store_true", help="write the table and the plot")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", default=str(RESULTS / "frontier.jsonl"))
    parser.add_argument("--plot", default=str(RESULTS / "frontier.png"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return parser.parse_args(argv)


def protocol(args: argparse.Namespace, keys: tuple[str, ...] = PROTOCOL_KEYS) -> dict:
    """The settings every cell shares; rows with another protocol are not reused."""
    return {key: getattr(args, key) for key in keys}


def variant(args: argparse.Namespace) -> dict:
    """What this run's cells change against the frontier's own (`VARIANT_DEFAULTS`)."""
    return {key: getattr(args, key) for key in VARIANT_DEFAULTS}


def parse_ablation(text: str) -> dict:
    """'search=greedy,lr=0.002' -> the defaults with those values (types and choices checked)."""
    var = dict(VARIANT_DEFAULTS)
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in VARIANT_DEFAULTS:
            raise SystemExit(f"--ablations {text!r}: expected KEY=VALUE with KEY one of {', '.join(VARIANT_DEFAULTS)}.")
        try:
            var[key] = type(VARIANT_DEFAULTS[key])(value)
        except ValueError:
            raise SystemExit(f"--ablations {text!r}: {key} takes a {type(VARIANT_DEFAULTS[key]).__name__}.") from None
        if key in VARIANT_CHOICES and value not in VARIANT_CHOICES[key]:
            raise SystemExit(f"--ablations {text!r}: {key} is one of {', '.join(VARIANT_CHOICES[key])}.")
    return var


def variant_label(row: dict) -> str:
    """'' for a frontier cell, else what the ablation row changes, e.g. 'greedy layers, lr 0.002'."""
    values = {**VARIANT_DEFAULTS, **row}
    parts = []
    if values["allocation"] == "sensitivity":
        parts.append("per layer by sensitivity")
    if values["search"] == "greedy":
        parts.append("greedy layers")
    if values["distill"] == "sequence":
        parts.append("sequence-level distillation")
    if values["steps"] != VARIANT_DEFAULTS["steps"]:
        parts.append(f"{values['steps']} e2e steps")
    if values["lr"] != VARIANT_DEFAULTS["lr"]:
        parts.append(f"lr {values['lr']:g}")
    return ", ".join(parts)


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_row(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(row) + "\n")


def find_row(rows: list[dict], kind: str, proto: dict, **keys) -> dict | None:
    """The row of this kind and protocol whose keys match (a key missing from a row: `VARIANT_DEFAULTS`)."""
    for row in rows:
        values = {**VARIANT_DEFAULTS, **row}
        matches = all(values.get(k) == v for k, v in keys.items())
        if row.get("kind") == kind and row.get("protocol") == proto and matches:
            return row
    return None


def frozen_base():
    from lisa_peft.pipeline.base_models import load_base_model

    model, tokenizer = load_base_model()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def _probe(args, model, calibration, probes: dict | None = None) -> dict[int, float]:
    """Every candidate layer's LM-loss increase as the only LiSA layer (fitted probes kept in `probes`)."""
    from lisa_peft import LisaConfig
    from lisa_peft.pipeline import calibration as C
    from lisa_peft.pipeline.convert import layer_sensitivity

    inputs = C.capture_attention_inputs(model, calibration)
    config = LisaConfig(lisa_layers="auto", target_fraction=0.5, init_lisa_weights="calibrate", r=args.probe_r)
    return layer_sensitivity(model, inputs, calibration[:16], config, fit_steps=100, fit_lr=3e-3,
                             probes=probes)["loss"]


def probe_order(args, rows, path, model, calibration) -> list[int]:
    """Candidate layers, least sensitive first (one probe shared by every cell)."""
    proto = protocol(args, PROBE_KEYS)
    found = find_row(rows, "probe", proto)
    if found is None:
        scores = _probe(args, model, calibration)
        found = {"kind": "probe", "protocol": proto, "loss": {str(k): v for k, v in scores.items()}}
        append_row(path, found)
        rows.append(found)
    scores = {int(k): v for k, v in found["loss"].items()}
    return sorted(scores, key=scores.__getitem__)


def greedy_order(args, rows, path, model, calibration, count: int) -> list[int]:
    """The first `count` layers of the greedy search (`lisa_peft.pipeline.convert.greedy_layers`) over the
    probe's fitted layers, in pick order: each fraction's set is a prefix, so the sets are nested here too."""
    from lisa_peft import LisaConfig
    from lisa_peft.pipeline.convert import greedy_layers

    proto = protocol(args, PROBE_KEYS)
    found = next((row for row in rows if row.get("kind") == "greedy" and row.get("protocol") == proto
                  and len(row["order"]) >= count), None)
    if found is None:
        probes: dict = {}
        scores = _probe(args, model, calibration, probes)
        config = LisaConfig(lisa_layers="auto", target_fraction=0.5, r=args.probe_r)
        if find_row(rows, "probe", proto) is None:  # the same probe: recorded, not run twice
            probe = {"kind": "probe", "protocol": proto, "loss": {str(k): v for k, v in scores.items()}}
            append_row(path, probe)
            rows.append(probe)
        search = greedy_layers(model, probes, scores, calibration[:16], config, count, by="loss")
        found = {"kind": "greedy", "protocol": proto, **search}
        append_row(path, found)
        rows.append(found)
    return found["order"][:count]


def distill(lisa, train: torch.Tensor, teacher, steps: int, lr: float, loss: str = "topk") -> None:
    """`steps` AdamW steps of distillation to the base model (batch 4, 10 warm-up steps, cosine).

    loss "topk": KL to the base model's top-64 log-probabilities on `train` [N, T] (`teacher`, `teacher_topk`,
    shared by all cells); "sequence": cross-entropy on `train` itself, the base model's own generations.
    """
    from lisa_peft.pipeline.training import topk_distillation_kl

    if steps <= 0:
        return
    params = [p for n, p in lisa.named_parameters() if "lisa_" in n]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    generator = torch.Generator().manual_seed(0)
    lisa.train()
    for _ in range(steps):
        pick = torch.randint(0, train.shape[0], (4,), generator=generator)
        if loss == "sequence":
            value = lisa(train[pick], labels=train[pick], use_cache=False).loss
        else:
            logits = lisa(train[pick], use_cache=False).logits
            value = topk_distillation_kl(logits, teacher.logprobs[pick], teacher.ids[pick])
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        schedule.step()
    lisa.eval()
    for p in params:
        p.requires_grad_(False)


def run_cell(args, proto, var, fraction, r, layers, model, tokenizer, sets, calibration, train, teacher, questions,
             base_arc):
    from lisa_peft import LisaConfig
    from lisa_peft.compact.lisa_llama.sizes import compact_sizes
    from lisa_peft.evaluation.fidelity import measure_fidelity
    from lisa_peft.evaluation.memory import kv_cache_bytes
    from lisa_peft.evaluation.zero_shot import zero_shot_accuracy
    from lisa_peft.pipeline.convert import convert

    start = time.monotonic()
    torch.manual_seed(0)
    base = copy.deepcopy(model)
    config = LisaConfig(lisa_layers=layers, init_lisa_weights="calibrate", r=r, rank_allocation=var["allocation"])
    lisa = convert(base, tokenizer, config, calibration_ids=calibration, layerwise_steps=args.layerwise_steps,
                   layerwise_lr=3e-3, progress=False)
    distill(lisa, train, teacher, var["steps"], var["lr"], var["distill"])
    row = {"kind": "cell", "protocol": proto, "fraction": fraction, "r": r, "lisa_layers": layers,
           "num_layers": model.config.num_hidden_layers, **var}
    if var["allocation"] != "uniform":
        row["layer_ranks"] = lisa.peft_config["default"].layer_ranks
    for text, windows in sets.items():
        f = measure_fidelity(lisa, windows, text, batch_size=8)
        row[text] = {"ppl_ratio": round(f.ppl_ratio, 4), "kl": round(f.kl, 4), "base_ppl": round(f.base_ppl, 3)}
    if questions:
        acc = zero_shot_accuracy(lisa, tokenizer, questions)
        row["arc_easy"] = {"n": acc.questions, "acc_norm": acc.acc_norm, "acc": acc.acc,
                           "base_acc_norm": base_arc.acc_norm, "base_acc": base_arc.acc}
    ranks = lisa.peft_config["default"].ranks()
    kv = kv_cache_bytes(model.config, layers, r=ranks, seq_len=1, dtype=torch.float16)
    row["kv_bytes_per_token_fp16"] = {"base": kv.base, "lisa": kv.lisa, "saving": round(1 - kv.lisa / kv.base, 4)}
    sizes = compact_sizes(lisa.merge_and_unload())
    row["compact_bytes_fp32"] = {"base": sizes.base, "compact": sizes.compact,
                                 "saving": round(1 - sizes.compact / sizes.base, 4)}
    row["qk_compression"] = round(sizes.qk_compression, 3)
    row["minutes"] = round((time.monotonic() - start) / 60, 2)
    return row


def measure_speed(model, tokenizer, layers: list[int], r: int, repeats: int) -> dict:
    """Greedy generate tokens/s, LiSA vs the same model with its adapter disabled (interleaved repeats)."""
    from peft import get_peft_model

    from lisa_peft import LisaConfig
    from lisa_peft.pipeline.data import embedded_corpus, token_windows

    lisa = get_peft_model(copy.deepcopy(model), LisaConfig(lisa_layers=layers, r=r)).eval()
    prompt = token_windows(tokenizer, embedded_corpus(), 128)[:1]
    new = 64
    kwargs = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False,
              "pad_token_id": tokenizer.pad_token_id}
    times: dict[str, list[float]] = {"base": [], "lisa": []}
    with torch.no_grad():
        lisa.generate(input_ids=prompt, **kwargs)  # warm-up
        for _ in range(repeats):
            for variant in ("base", "lisa"):
                begin = time.perf_counter()
                if variant == "base":
                    with lisa.disable_adapter():
                        lisa.generate(input_ids=prompt, **kwargs)
                else:
                    lisa.generate(input_ids=prompt, **kwargs)
                times[variant].append(time.perf_counter() - begin)
    ratios = [b / li for b, li in zip(times["base"], times["lisa"])]
    return {"ratio_median": round(statistics.median(ratios), 3), "ratio_min": round(min(ratios), 3),
            "ratio_max": round(max(ratios), 3), "prompt": prompt.shape[1], "new_tokens": new, "repeats": repeats}


def report(rows: list[dict], proto: dict, plot: Path | None) -> str:
    """The markdown table of every cell of this protocol (and the plot, when matplotlib is installed)."""
    cells = sorted((r for r in rows if r.get("kind") == "cell" and r.get("protocol") == proto),
                   key=lambda r: (r["fraction"], r["r"], variant_label(r) != "", variant_label(r)))
    speeds = {(r["fraction"], r["r"]): r["speed"]
              for r in rows if r.get("kind") == "speed" and r.get("protocol") == proto}
    texts = [t for t in ("pydoc", "shakespeare") if any(t in c for c in cells)]
    header = ["LiSA layers", "r (Q/K compression)", "KV cache / token saved", "compact params saved"]
    header += [f"{t}: ratio / KL" for t in texts] + ["ARC-Easy acc_norm (base)", "decode tok/s vs base (min–max)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in cells:
        arc = c.get("arc_easy")
        label = variant_label(c)
        speed = None if label else speeds.get((c["fraction"], c["r"]))
        cols = [f"{len(c['lisa_layers'])} / {c['num_layers']}",
                f"{c['r']}{' ' + label if label else ''} ({c['qk_compression']:.1f}x)",
                f"{100 * c['kv_bytes_per_token_fp16']['saving']:.1f} %",
                f"{100 * c['compact_bytes_fp32']['saving']:.1f} %"]
        cols += [f"{c[t]['ppl_ratio']:.3f} / {c[t]['kl']:.3f}" if t in c else "—" for t in texts]
        cols.append(f"{arc['acc_norm']:.3f} ({arc['base_acc_norm']:.3f})" if arc else "—")
        spread = f"{speed['ratio_median']:.2f} ({speed['ratio_min']:.2f}–{speed['ratio_max']:.2f})" if speed else "—"
        cols.append(spread)
        lines.append("| " + " | ".join(cols) + " |")
    if plot is not None and cells:
        draw(cells, texts, plot)
    return "\n".join(lines)


def draw(cells: list[dict], texts: list[str], path: Path) -> None:
    from lisa_peft.extras import require

    require("matplotlib", "plot", "the frontier plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(texts), figsize=(5.5 * len(texts), 4.2), squeeze=False)
    for ax, text in zip(axes[0], texts):
        for fraction in sorted({c["fraction"] for c in cells}):
            mine = sorted((c for c in cells if c["fraction"] == fraction and text in c and not variant_label(c)),
                          key=lambda c: c["kv_bytes_per_token_fp16"]["saving"])
            if not mine:
                continue
            xs = [100 * c["kv_bytes_per_token_fp16"]["saving"] for c in mine]
            ys = [c[text]["ppl_ratio"] for c in mine]
            ax.plot(xs, ys, marker="o", label=f"{len(mine[0]['lisa_layers'])}/{mine[0]['num_layers']} layers")
            for c, x, y in zip(mine, xs, ys):
                ax.annotate(f"r={c['r']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        labels = sorted({variant_label(c) for c in cells if text in c} - {""})
        for label, marker in zip(labels, "xs^vDP*"):
            ablation = [c for c in cells if variant_label(c) == label and text in c]
            ax.scatter([100 * c["kv_bytes_per_token_fp16"]["saving"] for c in ablation],
                       [c[text]["ppl_ratio"] for c in ablation], marker=marker, color="black", label=label)
        ax.axhline(1.05, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("KV cache saved per token (%)")
        ax.set_ylabel(f"perplexity ratio LiSA / base ({text}, held out)")
        ax.set_title(f"held-out {text}")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    import os

    from lisa_peft.evaluation.zero_shot import load_multiple_choice_jsonl, zero_shot_accuracy
    from lisa_peft.pipeline.sampled_corpus import sampled_windows
    from lisa_peft.pipeline.training import teacher_topk

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.heldout_dir:
        os.environ[HELDOUT_DIR_ENV] = args.heldout_dir
    if args.arc and not Path(args.arc).is_file():
        raise SystemExit(f"--arc {args.arc}: no such file (an ARC-style JSON-lines file, e.g. arc_easy_dev.jsonl).")
    variants = [variant(args)] + [parse_ablation(text) for text in args.ablations]
    if (args.speed or args.speed_only) and variant(args) != VARIANT_DEFAULTS:
        raise SystemExit("--speed measures the frontier's own cells: run it without the ablation options.")
    for fraction in args.fractions:
        if not 0 < fraction < 1:
            raise SystemExit(f"--fractions: {fraction} is not a fraction of the layers in (0, 1).")
    path = Path(args.results)
    proto = protocol(args)
    rows = read_rows(path)
    torch.manual_seed(0)
    model, tokenizer = frozen_base()
    num_layers = model.config.num_hidden_layers
    data = sampled_windows(model, tokenizer, max(args.sampled, args.calibration), 256)
    calibration, train = data[: args.calibration, :128], data[: args.sampled]

    def count(fraction: float) -> int:
        return max(1, round(fraction * num_layers))

    orders = {}
    if any(var["search"] == "greedy" for var in variants):  # first: its probe run records the probe's row too
        orders["greedy"] = greedy_order(args, rows, path, model, calibration, max(count(f) for f in args.fractions))
    orders["single"] = probe_order(args, rows, path, model, calibration)

    def layers_for(fraction: float, search: str = "single") -> list[int]:
        return sorted(orders[search][: count(fraction)])

    if not args.speed_only:
        sets = held_out_sets(tokenizer)
        questions = load_multiple_choice_jsonl(args.arc, limit=args.arc_limit) if args.arc else []
        base_arc = zero_shot_accuracy(model, tokenizer, questions) if questions else None
        needs_teacher = any(var["steps"] > 0 and var["distill"] == "topk" for var in variants)
        teacher = teacher_topk(model, train, k=64, batch_size=8) if needs_teacher else None
        for var in variants:
            for fraction in args.fractions:
                for r in args.ranks:
                    if find_row(rows, "cell", proto, fraction=fraction, r=r, **var):
                        continue
                    row = run_cell(args, proto, var, fraction, r, layers_for(fraction, var["search"]), model,
                                   tokenizer, sets, calibration, train, teacher, questions, base_arc)
                    print(json.dumps(row), flush=True)
                    append_row(path, row)
                    rows.append(row)
    if args.speed or args.speed_only:
        for fraction in args.fractions:
            for r in args.ranks:
                if find_row(rows, "speed", proto, fraction=fraction, r=r) is not None:
                    continue
                row = {"kind": "speed", "protocol": proto, "fraction": fraction, "r": r,
                       "speed": measure_speed(model, tokenizer, layers_for(fraction), r, args.repeats)}
                print(json.dumps(row), flush=True)
                append_row(path, row)
                rows.append(row)
    if args.report:
        table = report(rows, proto, Path(args.plot))
        print(table)
        (path.with_suffix(".md")).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
