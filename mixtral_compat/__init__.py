"""The seams where this project touches other libraries' internals: one module per library.

Each module names the library (`PACKAGE`) and the versions its uses were checked on (`CHECKED`, a PEP 440
specifier, the same range pyproject.toml allows); nothing outside this package reaches into a library's
private names. `check_versions()` compares the installed versions with every module's range without
importing the libraries (so a release that no longer imports is refused in one line too);
`exit_on_unchecked_versions()` is the start-up form every command runs (mixtral_tune/__init__.py, so
`mixtral-tune`, `python -m mixtral_tune.*` and train/*.py all run it before importing any library).

MIXTRAL_TUNE_UNCHECKED_VERSIONS=1 turns the refusal into a one-line warning on stderr, for trying a
release the seams were not checked on (their tests, tests/test_compat.py, say what changed shape).
"""

import ast
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

MODULES = ("torch", "transformers", "peft", "trl", "deepspeed", "bitsandbytes")
ALLOW_UNCHECKED = "MIXTRAL_TUNE_UNCHECKED_VERSIONS"


class UncheckedVersionError(ImportError):
    """An installed library outside the versions its seam was checked on (one line, names both)."""


def checked_ranges() -> dict[str, str]:
    """{package: CHECKED specifier} of every seam module, read from their source without importing
    them (they import their library)."""
    ranges = {}
    for name in MODULES:
        tree = ast.parse((Path(__file__).parent / f"{name}.py").read_text())
        constants = {
            node.targets[0].id: node.value.value
            for node in tree.body
            if isinstance(node, ast.Assign)
            and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Constant)
        }
        ranges[constants["PACKAGE"]] = constants["CHECKED"]
    return ranges


def installed_version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def version_problem(package: str, checked: str, installed: str | None) -> str | None:
    """One line when `installed` is missing or outside `checked`, else None. Local builds (2.13.0+cpu)
    count as their release."""
    if installed is None:
        return f"{package} is not installed; mixtral-tune needs {package}{checked} (pip install -e .)"
    if Version(installed) not in SpecifierSet(checked):
        return (
            f"{package} {installed} is installed; mixtral-tune was checked on {package}{checked}: "
            f"install a version in that range (./launch.sh sets up the tested ones from constraints.txt)"
        )
    return None


_warned: set[str] = set()


def check_versions() -> None:
    """Raise UncheckedVersionError (one line) for the first library outside its seam's range; with
    MIXTRAL_TUNE_UNCHECKED_VERSIONS=1 print that line once as a warning instead. Runs on
    `import mixtral_model` (the PEFT seam is installed there) and first in every command."""
    for package, checked in checked_ranges().items():
        problem = version_problem(package, checked, installed_version(package))
        if problem is None:
            continue
        if os.environ.get(ALLOW_UNCHECKED) != "1":
            raise UncheckedVersionError(f"{problem} (or set {ALLOW_UNCHECKED}=1 to try it)")
        if problem not in _warned:
            _warned.add(problem)
            print(f"warning: {problem} (going on: {ALLOW_UNCHECKED}=1)", file=sys.stderr)


def exit_on_unchecked_versions() -> None:
    """check_versions() as a command's first step: one line on stderr and exit status 2."""
    try:
        check_versions()
    except UncheckedVersionError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
