"""README's commands run, in a scratch directory holding the files they name (`my_chats.jsonl`,
`my_prefs.jsonl`: the bundled UltraChat- and UltraFeedback-shaped files):

- CPU commands (tiny recipes, ESFT, export) as written, cut to 2 training steps;
- the single-GPU Mixtral-8x7B jobs with their recipe, command line and data, on the tiny model of
  tests/test_recipes.py instead of Mixtral-8x7B (2 steps), so SFT -> export -> DPO runs end to end;
- the multi-GPU and multi-node jobs composed and validated (`--print-config`): this machine has no
  8 GPUs; tests/test_launch.py covers launch.sh's node logic.
"""

import re
import shlex
import shutil
import subprocess
import sys

import pytest
from pipeline_runs import REPO, run_env
from test_recipes import PACKED_LENGTH, TINY

README = REPO / "README.md"
DATA = REPO / "tests" / "data"
NOT_RUN_HERE = {"./launch.sh demo", "./launch.sh test"}  # tests/test_demo.py; the suite itself
TINY_MODEL = [f"model.architecture.{key}={value}" for key, value in TINY.items()]


def rank_zero_of(world_size: int) -> dict:
    """What torchrun sets for rank 0 of a job of `world_size` ranks."""
    return {"WORLD_SIZE": str(world_size), "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500"}  # fmt: skip


def readme_commands() -> list[str]:
    """Every command of README's bash blocks (continuations joined, comments dropped), then every inline
    `mixtral-tune ... +recipe=tiny/...` command of its text, in order of appearance."""
    text = README.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    inline = re.findall(
        r"`(mixtral-tune [a-z-]+ \+recipe=tiny/[^`]*)`", re.sub(r"```.*?```", "", text, flags=re.S)
    )
    return commands + [c for c in inline if c not in commands]


def argv_for(command: str) -> tuple[list[str], dict]:
    """(argv, extra environment) that runs `command` here (see the module docstring)."""
    words = shlex.split(command)
    env = {}
    while "=" in words[0] and not words[0].startswith(("+", "-")):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    if words[0] == "torchrun":  # torchrun --nproc_per_node=8 -m mixtral_tune.STAGE ARGS: as its rank 0
        module = words[words.index("-m") + 1]
        ranks = int(next(w for w in words if w.startswith("--nproc_per_node=")).split("=")[1])
        argv = [sys.executable, "-m", module, *words[words.index("-m") + 2 :], "--print-config"]
        return argv, rank_zero_of(ranks)
    if words[:2] in (
        ["./launch.sh", "sft"],
        ["./launch.sh", "dpo"],
    ):  # rank 0 of a multi-node job, 8 GPUs a node
        return [sys.executable, "-m", "mixtral_tune", *words[1:], "--print-config"], rank_zero_of(
            int(env.get("NNODES", 1)) * 8
        )
    assert words[0] == "mixtral-tune", command
    args = words[1:]
    if args[0] in ("sft", "dpo", "kto", "orpo", "cpo"):
        args.append("max_steps=2")
        if any(a.startswith("+recipe=mixtral-8x7b/") for a in args):
            if not any(a.startswith("model.name_or_path=") for a in args):
                args.append("model.name_or_path=null")
            args += [*TINY_MODEL, f"data.max_length={PACKED_LENGTH}", "trainer.report_to=none"]
    if args[0] == "esft-select":
        args += ["--rows", "16"]
    return [sys.executable, "-m", "mixtral_tune", *args], env


def test_readme_lists_the_jobs_it_promises():
    commands = readme_commands()
    assert any("sft_qlora" in c and "model=mixtral-8x7b-instruct" in c for c in commands)
    assert any(c.startswith("mixtral-tune export") for c in commands)
    assert any(c.startswith("torchrun --nproc_per_node=8") for c in commands)
    assert any(c.startswith("NNODES=2") for c in commands)
    assert len(README.read_text().splitlines()) <= 300


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_every_readme_command_runs(tmp_path):
    shutil.copy(DATA / "ultrachat_tiny.jsonl", tmp_path / "my_chats.jsonl")
    shutil.copy(DATA / "ultrafeedback_tiny.jsonl", tmp_path / "my_prefs.jsonl")
    ran = []
    for command in readme_commands():
        if command in NOT_RUN_HERE:
            continue
        argv, env = argv_for(command)
        result = subprocess.run(
            argv, cwd=tmp_path, env={**run_env(), **env}, capture_output=True, text=True, timeout=900
        )
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        ran.append(command)
    assert (tmp_path / "outputs" / "my-sft-merged" / "config.json").exists()
    assert (tmp_path / "outputs" / "my-dpo" / "final").is_dir()
    assert (tmp_path / "outputs" / "esft" / "final" / "esft_selection.json").exists()
    assert len(ran) >= 9, ran
