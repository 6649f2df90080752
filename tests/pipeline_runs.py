"""Helpers for tests that run the SFT/DPO entry points as a user would: subprocesses, small models."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SMALL_MODEL = [
    "model.architecture.hidden_size=32",
    "model.architecture.intermediate_size=64",
    "model.architecture.num_attention_heads=4",
    "model.architecture.num_key_value_heads=2",
    "model.architecture.num_local_experts=4",
    "model.architecture.num_hidden_layers=2",
    "trainer.logging_steps=1",
    "trainer.report_to=none",
    "trainer.eval_steps=null",
    "data.eval_path=null",
    "trainer.activation_checkpointing=false",
]
# The tiny SFT and DPO runs of the pipeline and resume tests: the small model, a learning rate that moves it
SFT = [
    "+recipe=tiny/sft",
    *SMALL_MODEL,
    "trainer.per_device_train_batch_size=8",
    "trainer.learning_rate=3e-3",
]
DPO = [
    "+recipe=tiny/dpo",
    *SMALL_MODEL,
    "trainer.per_device_train_batch_size=4",
    "trainer.learning_rate=1e-3",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_env() -> dict:
    """Offline, one thread, and this checkout's packages first: the entry points import mixtral_tune,
    and an install of another checkout must not answer for this one."""
    path = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))
    return {
        **os.environ,
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": path,
    }


def pipeline_command(stage: str, overrides: list[str], nproc: int = 1) -> list[str]:
    script = str(REPO / "train" / f"{stage}.py")
    if nproc == 1:
        return [sys.executable, script, *overrides]
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", script, *overrides,
    ]  # fmt: skip


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc). torchrun starts each rank in a session of its own, so
    neither its process group nor its death reaches them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def run_captured(command: list[str], timeout: float, **popen_kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True, timeout=timeout)`, except that a timeout
    (or the test's own, pytest-timeout's) kills every process the command started: torchrun's ranks
    too, which subprocess.run would leave running, holding CPU, ports, build locks and the output pipes."""
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kwargs
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as stopped:
        for pid in [*descendants(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate()
        if isinstance(stopped, subprocess.TimeoutExpired):
            raise subprocess.TimeoutExpired(command, timeout, output=out, stderr=err) from None
        raise
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def run_pipeline(stage: str, overrides: list[str], nproc: int = 1, timeout: int = 300, check: bool = True):
    result = run_captured(pipeline_command(stage, overrides, nproc), timeout, env=run_env())
    if check and result.returncode != 0:
        raise AssertionError(
            f"{stage} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def log_history(final_dir: Path) -> list[dict]:
    return json.loads((final_dir / "trainer_state.json").read_text())["log_history"]


def train_losses(final_dir: Path, key: str = "loss") -> list[float]:
    """Per-step training values (the end-of-training summary entry carries train_loss instead)."""
    return [entry[key] for entry in log_history(final_dir) if key in entry and "train_loss" not in entry]
