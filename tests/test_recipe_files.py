"""Recipes by name: bundled recipes resolve from any working directory, paths still win, typos get a suggestion."""

from __future__ import annotations

from pathlib import Path

import pytest

from lisa_peft.cli import main
from lisa_peft.pipeline.recipe_files import (
    RecipeNotFoundError,
    accelerate_config,
    bundled_recipes,
    describe,
    resolve_recipe,
)

ROOT = Path(__file__).resolve().parents[1]


def test_every_recipe_of_the_source_tree_is_bundled_by_its_stem() -> None:
    assert set(bundled_recipes()) == {path.stem for path in (ROOT / "recipes").glob("*.yaml")}


@pytest.mark.parametrize("spelling", ["quality_smollm2_cpu", "quality_smollm2_cpu.yaml",
                                      "recipes/quality_smollm2_cpu.yaml"])
def test_a_bundled_name_resolves_from_an_unrelated_working_directory(
    spelling: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    resolved = resolve_recipe(spelling)
    assert resolved.name == "quality_smollm2_cpu.yaml"
    assert resolved.read_bytes() == (ROOT / "recipes" / "quality_smollm2_cpu.yaml").read_bytes()


def test_an_existing_path_wins_over_a_bundled_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    own = tmp_path / "demo_smollm2_cpu.yaml"
    own.write_text("base_model: my-model\n")
    assert resolve_recipe("demo_smollm2_cpu.yaml").resolve() == own
    assert resolve_recipe(own) == own


def test_a_misspelt_name_is_refused_with_the_closest_bundled_name(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeNotFoundError, match="Did you mean 'llama2_7b'.*Bundled recipes: demo_smollm2_cpu"):
        resolve_recipe("llama2-7b")
    with pytest.raises(RecipeNotFoundError, match="neither a file nor a bundled recipe"):
        resolve_recipe("elsewhere/llama2_7b.yaml")  # a path in another folder is not a bundled name


def test_accelerate_configs_are_bundled_and_self_contained() -> None:
    for name in ("ddp", "fsdp", "deepspeed_zero2", "cpu_2proc"):
        text = accelerate_config(name).read_text()
        assert "recipes/" not in text.replace("# ", ""), f"{name} refers to a file relative to the checkout"
    with pytest.raises(RecipeNotFoundError, match="Did you mean 'ddp'"):
        accelerate_config("dpp")


def test_describe_is_the_first_comment_line() -> None:
    assert describe(bundled_recipes()["llama3_8b"]).startswith("GPU recipe: LLaMA-3-8B")


def test_cli_lists_the_recipes_and_prints_an_accelerate_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipes"]) == 0
    listing = capsys.readouterr().out
    for name in bundled_recipes():
        assert name in listing
    assert main(["recipes", "--accelerate-config", "fsdp"]) == 0
    assert Path(capsys.readouterr().out.strip()).is_file()
    assert main(["recipes", "--accelerate-config", "nope"]) == 2
    assert "Bundled: cpu_2proc" in capsys.readouterr().err


def test_cli_train_with_an_unknown_recipe_prints_one_message_and_exits_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["train", "qualty_smollm2_cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lisa-peft train: error: Recipe 'qualty_smollm2_cpu'")
    assert "Did you mean 'quality_smollm2_cpu'" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir()), "nothing may be written for a recipe that does not exist"
