"""`lisa-peft train RECIPE.yaml`: convert + train + save, with the standard transformers.Trainer."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="Run a training recipe (YAML): calibrate LiSA on a base model, train, save the adapter.",
        description="Run a bundled recipe by name (`lisa-peft recipes` lists them) or your own YAML file. "
        "Multi-GPU: `accelerate launch --config_file CONFIG -m lisa_peft.cli train RECIPE` (bundled configs: "
        "`lisa-peft recipes`).",
    )
    parser.add_argument("recipe", help="A bundled recipe's name (e.g. quality_smollm2_cpu) or a recipe YAML file.")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="Override a recipe value, e.g. --set training.max_steps=20 (repeatable).",
    )
    parser.add_argument("--no-resume", action="store_true", help="Ignore checkpoints already in output_dir.")
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..evaluation.operating_point import model_operating_point
    from ..pipeline.recipe import load_recipe, run_recipe
    from ..pipeline.recipe_files import resolve_recipe

    recipe = load_recipe(resolve_recipe(args.recipe), args.overrides)
    summary = run_recipe(recipe, progress=not args.quiet, resume=not args.no_resume)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("model", "eval_windows", "tokenizer")}, indent=2))
    seconds = summary["seconds"]
    stages = ", ".join(f"{name} {value / 60:.1f}" for name, value in seconds.items() if name != "total")
    print(f"wall time: {seconds['total'] / 60:.1f} min ({stages})")
    print("operating point: " + model_operating_point(summary["model"]).describe())
    return 0
