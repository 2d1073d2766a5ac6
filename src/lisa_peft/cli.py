"""`lisa-peft` command line: one sub-command per module in `lisa_peft.commands`.

Each command module exposes `add_parser(subparsers) -> argparse.ArgumentParser` and sets
`func=run` on its parser via `set_defaults`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Sub-command modules under lisa_peft.commands, in the order `--help` lists them.
COMMANDS: list[str] = ["demo", "fetch_model", "recipes", "analyze", "train", "push", "eval"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lisa-peft",
        description="LiSA: cross-layer attention sharing for pre-trained LLaMA models, as a PEFT method.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"lisa_peft.commands.{name}").add_parser(subparsers)
    return parser


def user_errors() -> tuple[type[Exception], ...]:
    """Errors that describe a user's fixable mistake: printed as one message, without a traceback."""
    from .extras import MissingExtraError
    from .pipeline.recipe_files import RecipeNotFoundError

    # A RecipeError (a wrong key, type or value in a recipe) can only come from an imported lisa_peft.pipeline.recipe;
    # looking it up there keeps torch and transformers out of the handling of every other error.
    recipe = sys.modules.get("lisa_peft.pipeline.recipe")
    return (MissingExtraError, RecipeNotFoundError) + ((recipe.RecipeError,) if recipe is not None else ())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except user_errors() as err:
        print(f"lisa-peft {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
