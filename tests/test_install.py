"""A plain (non-editable) `pip install .` into a fresh virtualenv, used from a directory outside the
checkout: the `mixtral-tune` command answers --help and runs a few steps of `+recipe=tiny/sft` on the
configs, recipe and demo data shipped inside the installed package.

The fresh venv borrows this environment's third-party packages (torch, TRL, ...) through a .pth file
naming our site-packages. Python adds those paths but does not run the .pth files inside them, so
this checkout's editable install (a .pth finder) stays out; the tests check that every import and
every shipped file comes from the new venv.
"""

import os
import shutil
import site
import subprocess
import venv
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BUILD_INPUTS = (
    "pyproject.toml", "README.md", "mixtral_model", "mixtral_parallel", "mixtral_compat", "mixtral_tune", "configs",
    "recipes", "data",
)  # fmt: skip


def run(command: list, cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv directory, its site-packages, a working directory outside the checkout, the environment)."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"  # a copy: pip's in-tree build writes build/ and *.egg-info next to the sources
    source.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, source / name)
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(VIRTUAL_ENV=str(env_dir), PATH=f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}",
               PIP_DISABLE_PIP_VERSION_CHECK="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")  # fmt: skip
    purelib_of = [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
    purelib = Path(run(purelib_of, root, env).stdout.strip())
    (purelib / "borrowed_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--ignore-installed", str(source)], root, env)  # fmt: skip
    shutil.rmtree(source)  # nothing may be read from the sources from here on
    work = root / "elsewhere"
    work.mkdir()
    return env_dir, purelib, work, env


def test_imports_and_shipped_files_come_from_the_installed_package(installed):
    env_dir, purelib, work, env = installed
    probe = (
        "import mixtral_model, mixtral_tune\n"
        "from mixtral_tune.shipped import CONFIG_DIR, DATA_DIR, RECIPE_DIR, recipe_files\n"
        "print(mixtral_model.__file__, mixtral_tune.__file__, CONFIG_DIR, RECIPE_DIR, DATA_DIR, sep='\\n')\n"
        "print(','.join(recipe_files()))"
    )
    *paths, recipes = run([env_dir / "bin" / "python", "-c", probe], work, env).stdout.splitlines()
    assert all(Path(path).is_relative_to(purelib) for path in paths), paths
    assert Path(paths[-1], "sft_train.jsonl").is_file() and Path(paths[2], "sft.yaml").is_file()
    assert {"tiny/sft", "tiny/dpo", "mixtral-8x7b/sft_qlora"} <= set(recipes.split(","))


def test_help_of_the_command_and_of_python_m(installed):
    env_dir, _, work, env = installed
    command, python = env_dir / "bin" / "mixtral-tune", env_dir / "bin" / "python"
    for help_command in ([command, "--help"], [python, "-m", "mixtral_tune", "--help"]):
        out = run(help_command, work, env, timeout=60).stdout
        assert (
            out.startswith("usage: mixtral-tune {sft,dpo,kto,orpo,cpo,esft-select,export,demo}")
            and "tiny/sft" in out
        )
    wrong = subprocess.run([command, "train"], cwd=work, env=env, capture_output=True, text=True)
    assert wrong.returncode == 2 and wrong.stderr.startswith("error: unknown command 'train'")


def test_a_few_tiny_sft_steps_from_outside_the_checkout(installed):
    env_dir, purelib, work, env = installed
    run([env_dir / "bin" / "mixtral-tune", "sft", "+recipe=tiny/sft", "max_steps=2", "output_dir=run",
         "trainer.logging_steps=1", "data.eval_path=null", "trainer.eval_steps=null",
         f"data.cache_dir={work / 'prepared'}"], work, env)  # fmt: skip
    final = work / "run" / "final"
    saved = {path.name for path in final.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "run_config.yaml",
        "trainer_state.json",
    } <= saved
    config = yaml.safe_load((final / "run_config.yaml").read_text())
    assert Path(config["data"]["path"]).is_relative_to(purelib)  # the demo data shipped in the package
    shebang = (env_dir / "bin" / "mixtral-tune").read_text().splitlines()[0]
    assert shebang == f"#!{env_dir / 'bin' / 'python'}"  # the command belongs to the new venv
