"""Where the files shipped with the code are: the Hydra config groups (`configs/`), the recipes
(`recipes/`) and the demo data (`data/`).

In a checkout they sit at its top, next to this package (`pip install -e .`, or PYTHONPATH); a plain
`pip install .` puts them inside the package (pyproject.toml's [tool.setuptools.package-dir] maps
each checkout directory to the package directory named in SHIPPED_DIRS; `data` would shadow the
module mixtral_tune.data, hence `demo_data`). This module imports nothing heavy: `mixtral-tune
--help` lists the recipes from it at once.
"""

from pathlib import Path

SHIPPED_DIRS = {"configs": "configs", "recipes": "recipes", "data": "demo_data"}  # checkout -> package


def shipped_dir(name: str) -> Path:
    """`configs`, `recipes` or `data`: inside the installed package, else at the top of the checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / SHIPPED_DIRS[name], package.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"{name}/ is neither in {package} nor next to it: reinstall mixtral-tune (pip install .)"
    )


CONFIG_DIR = shipped_dir("configs")
RECIPE_DIR = shipped_dir("recipes")
DATA_DIR = shipped_dir("data")


def recipe_files() -> dict[str, Path]:
    """Recipe name (`tiny/sft`) -> YAML file, for every recipe shipped in `recipes/`."""
    return {
        str(path.relative_to(RECIPE_DIR).with_suffix("")): path for path in sorted(RECIPE_DIR.rglob("*.yaml"))
    }
