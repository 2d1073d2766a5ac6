"""Where a recipe name or path points: the recipes bundled with the package, or a file of the user's.

`lisa-peft train NAME`, `lisa-peft demo --recipe NAME` and `lisa-peft recipes` go through here, so they work
from an installed wheel in any working directory. A path that exists always wins over a bundled name.
"""

from __future__ import annotations

import difflib
import importlib.resources
from pathlib import Path

BUNDLED_PACKAGE = "lisa_peft.bundled_recipes"
DEMO_RECIPE = "demo_smollm2_cpu"


def closest(value: object, choices: list[str] | tuple[str, ...] | set[str]) -> str | None:
    """The choice closest to `value` (difflib's default cutoff), for "did you mean" hints; None if none is close."""
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    return close[0] if close else None


class RecipeNotFoundError(FileNotFoundError):
    """Neither a file nor a bundled recipe; the message lists the bundled names."""


def bundled_recipes_dir() -> Path:
    """The folder of the bundled recipes (inside the installed package, or `recipes/` of an editable install)."""
    return Path(str(importlib.resources.files(BUNDLED_PACKAGE)))


def bundled_recipes() -> dict[str, Path]:
    """Bundled recipe name (file stem) -> file, sorted by name."""
    return {path.stem: path for path in sorted(bundled_recipes_dir().glob("*.yaml"))}


def accelerate_config(name: str) -> Path:
    """A bundled `accelerate launch` config by name (e.g. "ddp", "fsdp")."""
    configs = {path.stem: path for path in sorted((bundled_recipes_dir() / "accelerate").glob("*.yaml"))}
    if name not in configs:
        close = closest(name, list(configs))
        hint = f" Did you mean {close!r}?" if close else ""
        raise RecipeNotFoundError(f"No bundled accelerate config {name!r}.{hint} Bundled: {', '.join(configs)}.")
    return configs[name]


def describe(path: Path) -> str:
    """The recipe's one-line summary: its first comment line, without the '#'."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def resolve_recipe(name_or_path: str | Path) -> Path:
    """An existing file as given; else the bundled recipe of that name ('.yaml' optional)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    bundled = bundled_recipes()
    name = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    # "recipes/NAME.yaml" (the README's and a checkout's spelling) also finds the bundled copy.
    if path.parent.name in ("", ".", "recipes") and name in bundled:
        return bundled[name]
    close = closest(name, list(bundled))
    hint = f" Did you mean {close!r}?" if close else ""
    raise RecipeNotFoundError(
        f"Recipe {str(name_or_path)!r} is neither a file nor a bundled recipe.{hint} "
        f"Bundled recipes: {', '.join(bundled)} (`lisa-peft recipes` lists them)."
    )
