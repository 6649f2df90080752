"""Build locks of torch JIT extensions (how DeepSpeed builds its ops): one left by a killed process is
found and removed, one a live process holds is kept -- on torch's own lock (FileBaton) at the path
torch's own `load` uses, under both of its layouts."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from torch.utils import cpp_extension
from torch.utils.file_baton import FileBaton

from mixtral_compat.torch import clear_stale_extension_locks, stale_extension_locks

HOLD = """
import sys, time
from torch.utils.file_baton import FileBaton
assert FileBaton(sys.argv[1]).try_acquire()
print("held", flush=True)
time.sleep(600)
"""


def hold(lock: Path) -> subprocess.Popen:
    """A process that takes the lock the way torch's `load` does and keeps it until killed."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture(params=["TORCH_EXTENSIONS_DIR", "default root"])
def lock_path(request, tmp_path, monkeypatch):
    """Where torch's cpp_extension.load would put extension `ext`'s lock, under each layout."""
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    if request.param == "TORCH_EXTENSIONS_DIR":
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    build_dir = Path(cpp_extension._get_build_directory("ext", verbose=False))
    assert tmp_path in build_dir.parents
    return build_dir / "lock"


def test_a_lock_left_by_a_killed_process_is_removed_and_a_held_one_kept(lock_path):
    holder = hold(lock_path)
    try:
        assert stale_extension_locks() == []
        assert clear_stale_extension_locks() == [] and lock_path.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock_path.exists()  # killed while holding it: torch never deleted it
    assert stale_extension_locks() == [lock_path]
    assert clear_stale_extension_locks() == [lock_path]
    assert not lock_path.exists()
    baton = FileBaton(str(lock_path))
    assert baton.try_acquire()  # the next build can take it
    baton.release()


def test_the_pipeline_removes_a_stale_lock_before_deepspeed_starts(tmp_path):
    """A DeepSpeed run started after one killed while loading DeepSpeed's shared-memory comm op (the op
    every CPU run loads) names the lock it removed in one line, and trains; without the removal it
    would wait on the lock until the timeout."""
    from pipeline_runs import SFT, run_pipeline

    lock = Path(cpp_extension._get_build_directory("deepspeed_shm_comm", verbose=False)) / "lock"
    clear_stale_extension_locks()
    holder = hold(lock)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    run = run_pipeline(
        "sft", [*SFT, f"output_dir={tmp_path}", "deepspeed=zero2", "max_steps=1"], nproc=2, timeout=240
    )
    removed = [line for line in run.stdout.splitlines() if str(lock) in line]
    assert removed == [
        f"mixtral_tune: removed {lock}, a build lock of a DeepSpeed op left by a killed process"
    ]
    assert (tmp_path / "final").is_dir()
