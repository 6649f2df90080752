"""Every module imports on its own, whichever package a process imports first (the model, parallel and
compat packages import each other's modules, so an import cycle shows only in some orders)."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("mixtral_model", "mixtral_parallel", "mixtral_compat", "mixtral_tune")


def modules() -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__main__":
                continue
            found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


@pytest.mark.parametrize(
    "first", ["mixtral_parallel.expert_parallel", "mixtral_parallel.deepspeed_moe", "mixtral_compat.peft"]
)
def test_every_module_imports_after_any_first(first):
    names = [first] + [name for name in modules() if name != first]
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    result = subprocess.run(
        [sys.executable, "-c", code, *names], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
