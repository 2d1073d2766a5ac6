"""The built wheel holds every module and data file of the source tree, and nothing is left to a hand-kept list.

The wheel is built from a copy of the checkout (`pip wheel --no-deps --no-build-isolation`, about ten seconds) and its
file list compared with the two source roots (`src/lisa_peft`, `kernels/lisa_kernels`) and the data folders the
package ships (`model_cards/`, `recipes/`). A subpackage or template that the packaging config misses fails here,
not on a user's machine.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Source folder -> where its files sit inside the wheel.
SHIPPED_TREES: dict[str, str] = {
    "src/lisa_peft": "lisa_peft",
    "kernels/lisa_kernels": "lisa_kernels",
    "model_cards": "lisa_peft/model_cards",
    "recipes": "lisa_peft/bundled_recipes",
}
SHIPPED_SUFFIXES = (".py", ".md", ".yaml", ".json")


def expected_wheel_files(root: Path = ROOT) -> set[str]:
    """Every source module and data file that an installed package needs, as wheel paths."""
    expected = set()
    for source, target in SHIPPED_TREES.items():
        for path in (root / source).rglob("*"):
            if path.is_file() and path.suffix in SHIPPED_SUFFIXES and "__pycache__" not in path.parts:
                expected.add(f"{target}/{path.relative_to(root / source).as_posix()}")
    return expected


def copy_of_the_tree(dest: Path) -> Path:
    """The checkout's files (tracked and untracked, not ignored) copied to `dest`: a build there sees no stale
    `build/` folder of an earlier build in the checkout, as a fresh clone would."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    tree = copy_of_the_tree(tmp_path_factory.mktemp("tree"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(tree)],
        check=True, capture_output=True, text=True,
    )
    (wheel,) = out.glob("lisa_peft-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return {name for name in archive.namelist() if ".dist-info/" not in name}


def test_expected_list_covers_the_known_subpackages() -> None:
    """Guard the guard: the expected list itself sees the subpackages a hand-kept list once left out."""
    expected = expected_wheel_files()
    for module in ("lisa_peft/integrations/hub/__init__.py", "lisa_peft/integrations/loading/__init__.py",
                   "lisa_kernels/__init__.py",
                   "lisa_peft/model_cards/lisa_adapter.md", "lisa_peft/bundled_recipes/demo_smollm2_cpu.yaml"):
        assert module in expected


def test_wheel_holds_every_module_and_data_file_of_the_source_tree(wheel_files: set[str]) -> None:
    missing = sorted(expected_wheel_files() - wheel_files)
    assert not missing, f"the wheel lacks {len(missing)} source files (packaging config out of date): {missing}"


def test_wheel_holds_no_tests_benchmarks_or_caches(wheel_files: set[str]) -> None:
    stray = sorted(name for name in wheel_files
                   if name.split("/")[0] not in ("lisa_peft", "lisa_kernels") or "__pycache__" in name)
    assert not stray, f"unexpected files in the wheel: {stray}"
