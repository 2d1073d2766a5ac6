"""`lisa-peft eval --base BASE --adapter ADAPTER --tasks T1,T2`: lm-evaluation-harness on a LiSA model.

Runs `lm_eval.simple_evaluate` in this process with the ``hf-lisa`` model (`lisa_peft.evaluation.lm_eval_model`),
so `lisa_peft` is imported and the LiSA adapter loads through PEFT. Prints lm_eval's results table and
optionally writes the full results as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a base model with a LiSA adapter on lm-evaluation-harness tasks",
        description=(
            "Load BASE with transformers and ADAPTER with PEFT (lm_eval model 'hf-lisa') and run the "
            "lm-evaluation-harness tasks TASKS on it. Needs the 'eval' extra: pip install 'lisa-peft[eval]'."
        ),
    )
    parser.add_argument("--base", required=True, metavar="BASE", help="base model: Hub id or local folder")
    parser.add_argument(
        "--adapter", default=None, metavar="ADAPTER",
        help="LiSA adapter: Hub id or folder from save_pretrained (omit to evaluate the base model alone)",
    )
    parser.add_argument("--tasks", required=True, metavar="T1,T2", help="comma-separated lm_eval task names")
    parser.add_argument(
        "--include-path", default=None, metavar="DIR", help="extra folder of task YAML configs (lm_eval include_path)"
    )
    parser.add_argument(
        "--no-builtin-tasks", action="store_true",
        help="index only the tasks under --include-path, not lm_eval's built-in ones (much faster start)",
    )
    parser.add_argument(
        "--limit", type=float, default=None, metavar="N",
        help="examples per task (a value below 1 is a fraction of the task; for quick checks only)",
    )
    parser.add_argument("--batch-size", default="1", metavar="B", help="batch size, or 'auto' (default: 1)")
    parser.add_argument("--num-fewshot", type=int, default=None, metavar="K", help="few-shot examples per prompt")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="auto", help="model dtype, e.g. bfloat16 (default: auto)")
    parser.add_argument("--output", default=None, metavar="FILE", help="write the results as JSON to FILE")
    parser.add_argument(
        "--log-samples", action="store_true", help="include every example's inputs and scores in --output"
    )
    parser.set_defaults(func=run)
    return parser


def _limit(value: float | None) -> int | float | None:
    """lm_eval reads an int as a count and a float below 1 as a fraction."""
    if value is None or value < 1:
        return value
    return int(value)


def evaluate_adapter(
    base: str,
    adapter: str | None,
    tasks: list[str],
    include_path: str | None = None,
    builtin_tasks: bool = True,
    limit: int | float | None = None,
    batch_size: int | str = 1,
    num_fewshot: int | None = None,
    device: str | None = None,
    dtype: str = "auto",
    log_samples: bool = False,
) -> dict:
    """lm_eval results dict (keys ``results``, ``config``, ... and ``samples`` if `log_samples`)."""
    from ..extras import require

    lm_eval = require("lm_eval", "eval", "`lisa-peft eval` (lm-evaluation-harness)")
    import torch
    from lm_eval.tasks import TaskManager

    import lisa_peft.evaluation.lm_eval_model  # noqa: F401  (registers the "hf-lisa" model)

    if include_path is None and not builtin_tasks:
        raise ValueError("--no-builtin-tasks needs --include-path (there would be no tasks at all).")
    task_manager = TaskManager(include_path=include_path, include_defaults=builtin_tasks)
    model_args: dict[str, str] = {"pretrained": base, "dtype": dtype}
    if adapter:
        model_args["adapter"] = adapter
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = lm_eval.simple_evaluate(
        model="hf-lisa",
        model_args=model_args,
        tasks=tasks,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        device=device,
        limit=limit,
        task_manager=task_manager,
        log_samples=log_samples,
    )
    if results is None:  # non-zero rank of a distributed run
        return {}
    return dict(results)


def run(args: argparse.Namespace) -> int:
    from ..extras import require

    require("lm_eval", "eval", "`lisa-peft eval` (lm-evaluation-harness)")
    from lm_eval.utils import handle_non_serializable, make_table

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    batch_size = int(args.batch_size) if args.batch_size.isdigit() else args.batch_size
    try:
        results = evaluate_adapter(
            args.base, args.adapter, tasks, include_path=args.include_path,
            builtin_tasks=not args.no_builtin_tasks, limit=_limit(args.limit), batch_size=batch_size,
            num_fewshot=args.num_fewshot, device=args.device, dtype=args.dtype, log_samples=args.log_samples,
        )
    except (ValueError, KeyError, FileNotFoundError, OSError) as err:
        print(f"lisa-peft eval: {err}", file=sys.stderr)
        return 1
    if not results:
        return 0
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
        print(f"wrote {out}")
    return 0
