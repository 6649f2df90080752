"""launch.sh's process and node logic: the torchrun command it builds from NPROC, NNODES, NODE_RANK,
MASTER_ADDR/PORT, the GPU count and SLURM's variables, seen through fake `torchrun`, `nvidia-smi` and
`scontrol` executables on PATH that print what they were given."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
LAUNCH_ENV = ("NPROC", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RDZV_ID")


def fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(0o755)


def launched(tmp_path, env: dict, gpus: int | None = None, nodelist_hosts: tuple[str, ...] = ()) -> list[str]:
    """The argv launch.sh hands to torchrun for `./launch.sh sft +recipe=tiny/sft max_steps=2`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    fake(bin_dir, "torchrun", 'printf "%s\\n" "$@"')
    if gpus is not None:
        fake(bin_dir, "nvidia-smi", "".join(f'echo "GPU {i}: H100 (UUID: GPU-{i})"\n' for i in range(gpus)))
    if nodelist_hosts:
        fake(bin_dir, "scontrol", 'printf "%s\\n" ' + " ".join(nodelist_hosts))
    # PATH: the fakes, then the shell's basics only (no real nvidia-smi/scontrol/torchrun from the host)
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and not k.startswith("SLURM_")}
    full_env = {**base, "PATH": f"{bin_dir}:/usr/bin:/bin", "VIRTUAL_ENV": str(tmp_path / "venv"), **env}
    proc = subprocess.run(
        [str(REPO / "launch.sh"), "sft", "+recipe=tiny/sft", "max_steps=2"],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_one_node_without_gpus_runs_one_process_on_the_default_port(tmp_path):
    argv = launched(tmp_path, {})
    assert argv == shlex.split(
        "--nnodes 1 --node_rank 0 --nproc_per_node 1 --master_addr 127.0.0.1 --master_port 29500 "
        "-m mixtral_tune.sft +recipe=tiny/sft max_steps=2"
    )


def test_one_process_per_gpu_unless_nproc_says_otherwise(tmp_path):
    assert option(launched(tmp_path / "a", {}, gpus=4), "--nproc_per_node") == "4"
    assert option(launched(tmp_path / "b", {"NPROC": "2"}, gpus=4), "--nproc_per_node") == "2"
    assert option(launched(tmp_path / "c", {"NPROC": "3"}), "--nproc_per_node") == "3"


def test_several_nodes_meet_at_a_c10d_rendezvous_on_master_addr_and_port(tmp_path):
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "6000", "NPROC": "8"}
    argv = launched(tmp_path, env)
    assert argv == shlex.split(
        "--nnodes 2 --node_rank 1 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint 10.0.0.5:6000 "
        "--rdzv-id mixtral-tune -m mixtral_tune.sft +recipe=tiny/sft max_steps=2"
    )
    assert "--master_port" not in argv


def test_slurm_variables_give_nodes_node_rank_master_and_job_id(tmp_path):
    env = {
        "SLURM_NNODES": "4",
        "SLURM_NODEID": "3",
        "SLURM_JOB_NODELIST": "gpu[17-20]",
        "SLURM_JOB_ID": "991",
    }
    argv = launched(tmp_path, env, gpus=8, nodelist_hosts=("gpu17", "gpu18", "gpu19", "gpu20"))
    assert option(argv, "--nnodes") == "4"
    assert option(argv, "--node_rank") == "3"
    assert option(argv, "--nproc_per_node") == "8"
    assert option(argv, "--rdzv-endpoint") == "gpu17:29500"  # the first host of the job's node list
    assert option(argv, "--rdzv-id") == "991"


def test_explicit_settings_win_over_slurm(tmp_path):
    env = {
        "SLURM_NNODES": "4", "SLURM_NODEID": "3", "SLURM_JOB_NODELIST": "gpu[17-20]",
        "NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "head", "MASTER_PORT": "7000",
    }  # fmt: skip
    argv = launched(tmp_path, env, nodelist_hosts=("gpu17",))
    assert (option(argv, "--nnodes"), option(argv, "--node_rank")) == ("2", "0")
    assert option(argv, "--rdzv-endpoint") == "head:7000"


@pytest.mark.parametrize("command", ["", "train"])
def test_unknown_command_prints_usage_and_exits_2(command):
    proc = subprocess.run([str(REPO / "launch.sh"), command], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: ./launch.sh demo | test") and proc.stderr.count("\n") == 1
