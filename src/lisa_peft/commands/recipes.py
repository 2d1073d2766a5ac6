"""`lisa-peft recipes`: the recipes bundled with the package, by name, with their one-line summaries."""

from __future__ import annotations

import argparse
import sys

from lisa_peft.pipeline.recipe_files import (
    RecipeNotFoundError,
    accelerate_config,
    bundled_recipes,
    bundled_recipes_dir,
    describe,
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "recipes",
        help="List the bundled recipes (run one with `lisa-peft train NAME`).",
        description="List the recipes that ship with lisa-peft. `lisa-peft train NAME` runs one; "
        "copy its file (--path prints where it lies) to make your own.",
    )
    parser.add_argument("--path", action="store_true", help="Also print each recipe's file path.")
    parser.add_argument("--accelerate-config", metavar="NAME", default=None,
                        help="Print only the path of a bundled accelerate config (ddp, fsdp, deepspeed_zero2, "
                        "cpu_2proc), for `accelerate launch --config_file \"$(lisa-peft recipes --accelerate-config "
                        "ddp)\"`.")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.accelerate_config:
        try:
            print(accelerate_config(args.accelerate_config))
        except RecipeNotFoundError as err:
            print(f"lisa-peft recipes: {err}", file=sys.stderr)
            return 2
        return 0
    recipes = bundled_recipes()
    width = max(map(len, recipes))
    for name, path in recipes.items():
        print(f"{name:<{width}}  {describe(path)}")
        if args.path:
            print(f"{'':<{width}}  {path}")
    configs = ", ".join(sorted(p.stem for p in (bundled_recipes_dir() / "accelerate").glob("*.yaml")))
    print(f"\naccelerate launch configs ({configs}): lisa-peft recipes --accelerate-config NAME")
    return 0
