"""Every use of torch internals (private or undocumented names) in this project, in one place.

CHECKED is the range of torch versions these were checked against; `mixtral_compat.check_versions()`
refuses others at start-up with one line. Code elsewhere calls the functions here, never the
internals themselves.

- `has_hooks` / `has_global_forward_hooks`: the grouped expert kernels read expert weights without
  calling their modules, which is only right when nothing hooks those calls; torch has no public way
  to ask a module (or `nn.Module` globally) whether hooks are registered.
- `cpu_has_native_bf16`: `torch.cpu._is_avx512_bf16_supported`.
- `stale_extension_locks`: where `torch.utils.cpp_extension.load` keeps an extension's build lock
  (`<TORCH_EXTENSIONS_DIR or default root>[/py<ver>_<device>]/<name>/lock`, a `FileBaton` the building
  process holds open). DeepSpeed JIT-builds its ops (fused/CPU Adam, CPU shared-memory comm) this way.
"""

import os
from pathlib import Path

import torch
from torch import nn

PACKAGE = "torch"
CHECKED = ">=2.11,<2.14"  # 2.11 (CUDA, bench/gpu_check.py on an H200) and 2.13 (CPU, the suite)


def has_hooks(module: nn.Module, backward: bool = True) -> bool:
    """Forward (pre-)hooks on `module`, and with backward=True its backward (pre-)hooks too."""
    hooked = bool(module._forward_hooks or module._forward_pre_hooks)
    if backward:
        hooked = hooked or bool(module._backward_hooks or getattr(module, "_backward_pre_hooks", None))
    return hooked


def has_global_forward_hooks() -> bool:
    """Hooks registered for every module (`nn.modules.module.register_module_forward_hook` and its pre form)."""
    from torch.nn.modules import module as torch_module

    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16/AMX); False where torch cannot say."""
    return getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()


def extension_build_roots() -> list[Path]:
    """Where torch's JIT extension builds live: TORCH_EXTENSIONS_DIR, or the default root and its
    per-Python/per-device subfolders."""
    from torch.utils.cpp_extension import get_default_build_root

    explicit = os.environ.get("TORCH_EXTENSIONS_DIR")
    return [Path(explicit)] if explicit else [Path(get_default_build_root())]


def _open_paths() -> set[str] | None:
    """Every path the processes this user can see hold open (Linux /proc: another user's processes are
    not listed); None where /proc cannot be read."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    held = set()
    for fd_dir in proc.glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                try:
                    held.add(os.readlink(fd))
                except OSError:
                    pass
        except OSError:
            pass
    return held


def stale_extension_locks() -> list[Path]:
    """Build locks of torch JIT extensions that no process holds open. torch's FileBaton keeps the lock
    file open while it builds or checks an extension and deletes it when done; a process killed in
    between (SIGTERM, SIGKILL) leaves it behind, and every later load of that extension waits on it
    forever without a word. Only this user's locks are judged (other users' processes cannot be seen);
    empty where open files cannot be listed (not Linux)."""
    locks = [
        lock for root in extension_build_roots() for lock in (*root.glob("*/lock"), *root.glob("*/*/lock"))
    ]
    if not locks:
        return []
    held = _open_paths()
    if held is None:
        return []
    mine = [lock for lock in locks if _owned_by_this_user(lock)]  # others' holders are not visible
    return [lock for lock in mine if str(lock.resolve()) not in held and str(lock) not in held]


def _owned_by_this_user(path: Path) -> bool:
    try:
        return path.stat().st_uid == os.getuid()
    except OSError:
        return False


def clear_stale_extension_locks() -> list[Path]:
    """Delete the locks `stale_extension_locks` finds; returns those deleted. Call it where no other
    process of the same job can be building yet (one process per machine, before DeepSpeed starts)."""
    cleared = []
    for lock in stale_extension_locks():
        try:
            lock.unlink()
            cleared.append(lock)
        except FileNotFoundError:
            pass
    return cleared
