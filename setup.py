"""Package discovery for lisa-peft's two source roots; all metadata lives in setup.cfg.

Packages are found, not listed: every package under `src/` and `kernels/` is shipped, and the data folders
`model_cards/` and `recipes/` are mapped into the package (`lisa_peft.model_cards`,
`lisa_peft.bundled_recipes`). `tests/test_packaging.py` builds the wheel and checks it holds every file.
"""

from setuptools import find_packages, setup

SOURCE_ROOTS = ("src", "kernels")
DATA_PACKAGES = {"lisa_peft.model_cards": "model_cards", "lisa_peft.bundled_recipes": "recipes"}

package_dir: dict[str, str] = dict(DATA_PACKAGES)
packages: list[str] = list(DATA_PACKAGES)
for root in SOURCE_ROOTS:
    found = find_packages(root)
    packages += found
    package_dir.update({name: f"{root}/{name}" for name in found if "." not in name})

setup(packages=packages, package_dir=package_dir)
