"""One run owns its output directory, and what it leaves there is whole.

* `take_output_dir(cfg)`: an exclusive `fcntl.flock` on `OUTPUT_DIR/.mixtral-tune.lock`, held for
  the run's life (the OS drops it when the process dies, so a lock left by a killed run is free
  again); the file names the holder (pid, host, start) and is removed when the run ends. A second run into the same directory
  refuses at once naming the holder. Under torchrun rank 0 takes it; the other ranks on its node
  wait until the file names their own launch (they go on) or another live run (they refuse with
  the same line), so every rank of a refused launch exits before any collective.
* `check_random_init_base(cfg)`: `OUTPUT_DIR/base/` (the seeded random init) records the
  architecture, tokenizer and seed it was written for (`random_init.json`); one left by another run
  is rebuilt when nothing was trained from it, and refused otherwise.
* `save_final_atomically`: `final/` is staged in `OUTPUT_DIR/.final.staging`, marked complete last
  (`final_complete.json`: every file with its size), then renamed into place; `final_problem` is the
  check every reader of one makes (DPO from an SFT output, export, evaluation).
"""

import fcntl
import json
import os
import shutil
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

LOCK_NAME = ".mixtral-tune.lock"
STAGING_NAME = ".final.staging"
FINAL_MARKER = "final_complete.json"
BASE_RECORD = "random_init.json"
WAIT_FOR_RANK_0_S = 300

_held: dict[
    Path, tuple[int, bool]
] = {}  # output_dir -> (open lock file descriptor, whether this run made the dir)


class OutputDirError(ValueError):
    """The output directory cannot be used by this run; the message names the directory and the fix."""


def launch_id() -> str:
    """The same for every local rank of one torchrun launch (their parent is its agent), else this process."""
    if "LOCAL_RANK" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ:
        return f"torchrun:{socket.gethostname()}:{os.getppid()}:{os.environ.get('MASTER_PORT')}"
    return f"process:{socket.gethostname()}:{os.getpid()}"


def describe_holder(record: dict) -> str:
    return f"pid {record.get('pid')} on {record.get('host')}, started {record.get('started')}"


def read_holder(lock_file: Path) -> dict | None:
    try:
        return json.loads(lock_file.read_text()) or None
    except (OSError, ValueError):
        return None


def take_output_dir(output_dir: str | Path) -> None:
    """Hold OUTPUT_DIR for this run (see the module docstring), or raise OutputDirError."""
    output = Path(output_dir)
    if output.resolve() in _held:
        return
    if int(os.environ.get("RANK", "0")) != 0:
        if os.environ.get("GROUP_RANK", "0") == "0":  # rank 0's node: its file is visible here
            wait_for_rank_0(output / LOCK_NAME)
        return
    made = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(output / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = read_holder(output / LOCK_NAME) or {}
            raise OutputDirError(in_use_message(output, holder)) from None
        if same_file(fd, output / LOCK_NAME):
            break
        os.close(fd)  # its holder removed it as this run locked it: lock the file at that path now
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "launch": launch_id(),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    _held[output.resolve()] = (fd, made)


def same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def in_use_message(output: Path, holder: dict) -> str:
    return (
        f"output_dir={output} is in use by another run ({describe_holder(holder)}): wait for it to end, "
        "or pass a new output_dir"
    )


def wait_for_rank_0(lock_file: Path) -> None:
    """A rank other than 0 (on rank 0's node): go on once the lock names this launch; refuse as rank 0
    does when it names another live run."""
    deadline = time.monotonic() + WAIT_FOR_RANK_0_S
    while time.monotonic() < deadline:
        holder = read_holder(lock_file)
        if holder and holder.get("launch") == launch_id():
            return
        if holder and holder.get("host") == socket.gethostname() and pid_alive(holder.get("pid")):
            raise OutputDirError(in_use_message(lock_file.parent, holder))
        time.sleep(0.2)
    raise OutputDirError(
        f"output_dir={lock_file.parent}: rank 0 did not take {LOCK_NAME} within {WAIT_FOR_RANK_0_S} s; "
        "check rank 0's output"
    )


def pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def release_output_dir(output_dir: str | Path) -> None:
    """Give OUTPUT_DIR back: the lock file is removed (while still locked), then unlocked; a directory
    this run made and left empty (a run refused before it wrote anything) is removed too."""
    output = Path(output_dir).resolve()
    fd, made = _held.pop(output, (None, False))
    if fd is None:
        return
    (output / LOCK_NAME).unlink(missing_ok=True)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    if made and not any(output.iterdir()):
        output.rmdir()


def release_every_output_dir() -> None:
    """On the way out of a refused run: nothing of this run stays behind in any output_dir."""
    for output in list(_held):
        release_output_dir(output)


# --- OUTPUT_DIR/base: the random init ---


def random_init_record(cfg) -> dict:
    """What OUTPUT_DIR/base is written for: the architecture, the tokenizer setting and the seed."""
    from omegaconf import OmegaConf

    return {
        "model.architecture": OmegaConf.to_container(cfg.model.architecture),
        "model.tokenizer": cfg.model.tokenizer,
        "trainer.seed": cfg.trainer.seed,
    }


def base_mismatch(cfg) -> str | None:
    """How OUTPUT_DIR/base differs from what this run would write there ('' when it has no record),
    or None when it matches or does not exist."""
    base = Path(cfg.output_dir) / "base"
    if cfg.model.name_or_path or not base.exists():
        return None
    try:
        recorded = json.loads((base / BASE_RECORD).read_text())
    except (OSError, ValueError):
        return ""
    wanted = random_init_record(cfg)
    differences = []
    for key, value in wanted.items():
        if isinstance(value, dict):
            old = recorded.get(key) or {}
            differences += [f"{key}.{k}={old.get(k)} (now {v})" for k, v in value.items() if old.get(k) != v]
        elif recorded.get(key) != value:
            differences.append(f"{key}={recorded.get(key)} (now {value})")
    return ", ".join(differences) or None


def check_random_init_base(cfg, resuming: bool) -> bool:
    """Whether OUTPUT_DIR/base must be rebuilt before use; OutputDirError when it cannot be."""
    mismatch = base_mismatch(cfg)
    if mismatch is None:
        return False
    base = Path(cfg.output_dir) / "base"
    if mismatch == "":
        raise OutputDirError(
            f"{base} has no {BASE_RECORD}: it was not written by this version's random init, so it is not "
            "trained; move it away (or pass model.name_or_path) or use a new output_dir"
        )
    if resuming:
        raise OutputDirError(
            f"{base} was written for {mismatch}: the checkpoints here were trained from it; resume with "
            "the settings it was written for, or start a new output_dir"
        )
    return True


def write_random_init_record(cfg, directory: Path) -> None:
    (directory / BASE_RECORD).write_text(json.dumps(random_init_record(cfg), indent=1))


# --- OUTPUT_DIR/final: staged, marked, renamed ---


def staging_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / STAGING_NAME


def mark_final_complete(directory: Path) -> None:
    """`final_complete.json` (every file under `directory` with its size), written atomically, last."""
    from mixtral_tune.training.resume import write_completeness_marker

    write_completeness_marker(directory, FINAL_MARKER)


def put_final_in_place(staged: Path, final: Path) -> None:
    """Rename the marked staging directory to `final` (an earlier final of this run is replaced)."""
    mark_final_complete(staged)
    if final.exists():
        previous = final.with_name(f"{STAGING_NAME}.previous")
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(final, previous)
        os.replace(staged, final)
        shutil.rmtree(previous)
    else:
        os.replace(staged, final)


def final_problem(path: str | Path) -> str | None:
    """Why `path`, a pipeline's output, is not a complete one (one line), or None when it is, or is not
    a pipeline output at all (a hub checkpoint, or a directory this framework did not write)."""
    path = Path(path)
    if path.name.startswith(STAGING_NAME):
        return f"{path} is the staging directory of a final save that did not finish"
    ours = (path / "run_config.yaml").exists() or (path / FINAL_MARKER).exists()
    beside_a_run = (path.parent / "base").is_dir() or any(path.parent.glob("checkpoint-*"))
    if not ours and not (path.name == "final" and beside_a_run):
        return None
    try:
        files = json.loads((path / FINAL_MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{path} has no readable {FINAL_MARKER}: its save did not finish"
    from mixtral_tune.training.resume import listed_files_problem

    problem = listed_files_problem(path, files)
    return f"{path}: {problem}" if problem else None


def require_complete_final(key: str, path: str | Path) -> None:
    """Raise OutputDirError naming `key` when `path` is an incomplete pipeline output."""
    problem = final_problem(path)
    if problem:
        raise OutputDirError(f"{key}={path}: {problem}; rerun (or resume) the run that writes it")
