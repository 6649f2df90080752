"""Reading the pickled files of a checkpoint executes nothing, and what they hold is finite.

torch's `weights_only=True` unpickler rebuilds only tensors, containers and numbers, plus the globals
a caller allows (`torch.serialization.safe_globals`). `CHECKPOINT_GLOBALS` is exactly what the files
a resume reads hold beyond that: numpy's array and dtype in the Trainer's RNG states, and DeepSpeed's
enums, loss scaler and parameter-fragment records in its model and optimizer states. A file that
needs anything else is refused, naming the file and the global, before any of it runs.

`checkpoint_problem_on_any_rank` reads every such file of a checkpoint before training resumes
(each rank the files it will load; every rank gets the first problem, so all stop together), and
checks every floating tensor in them, and in the checkpoint's safetensors weights, is finite.
DeepSpeed's checkpoint engine is routed through `load_checkpoint_file` too
(mixtral_compat/deepspeed.py), so its own reads later use the same unpickler and allow-list.
"""

import pickle
import re
from pathlib import Path

import torch
from safetensors import safe_open

# Pickle files a resume reads; training_args.bin is written beside them but never read back.
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
NOT_READ_ON_RESUME = ("training_args.bin",)
RANK_IN_NAME = re.compile(r"(?:zero_pp_rank_|rng_state_)(\d+)[_.]")


def checkpoint_globals() -> list:
    """The globals the checkpoint files hold beyond torch's defaults (see the module docstring)."""
    import numpy
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [
        numpy._core.multiarray._reconstruct,
        numpy.ndarray,
        numpy.dtype,
        type(numpy.dtype("uint32")),
        ZeroStageEnum,
        LossScaler,
        DynamicLossScaler,
        fragment_address,
    ]


class UnsafeCheckpointFile(ValueError):
    """A checkpoint file that cannot be read without running code, or that holds non-finite values."""


def load_checkpoint_file(path, map_location=None):
    """torch.load with weights_only=True and `checkpoint_globals()`; UnsafeCheckpointFile otherwise."""
    try:
        with torch.serialization.safe_globals(checkpoint_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path)) or "a non-data object"
        raise UnsafeCheckpointFile(
            f"{path} needs {unsafe} to load, which a checkpoint never holds: it was not written by "
            "this training (or was tampered with), so it is not loaded; resume from a checkpoint you trust"
        ) from error


def nonfinite_tensor(value, where: str = "") -> str | None:
    """The path of the first floating tensor in `value` (nested dicts/lists) with a NaN or inf, if any."""
    if isinstance(value, torch.Tensor):
        return where or "a tensor" if value.is_floating_point() and not torch.isfinite(value).all() else None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = nonfinite_tensor(item, f"{where}[{key!r}]")
        if found:
            return found
    return None


def file_problem(path: Path) -> str | None:
    try:
        if path.suffix == ".safetensors":
            with safe_open(path, "pt") as weights:
                bad = next((k for k in weights.keys() if not is_finite(weights.get_tensor(k))), None)
        else:
            bad = nonfinite_tensor(load_checkpoint_file(path, map_location="cpu"))
    except UnsafeCheckpointFile as error:
        return str(error)
    if bad:
        return (
            f"{path} holds NaN or infinite values ({bad}): the run had diverged when it was saved; "
            "resume from an earlier checkpoint"
        )
    return None


def is_finite(tensor: torch.Tensor) -> bool:
    return not tensor.is_floating_point() or bool(torch.isfinite(tensor).all())


def files_to_check(checkpoint: Path, rank: int, world_size: int) -> list[Path]:
    """The files of `checkpoint` this rank checks: those naming its rank, and on rank 0 all the rest."""
    files = []
    for path in sorted(checkpoint.rglob("*")):
        if not path.is_file() or path.name in NOT_READ_ON_RESUME:
            continue
        if path.suffix not in (*PICKLE_SUFFIXES, ".safetensors"):
            continue
        named = RANK_IN_NAME.search(path.name)
        owner = int(named.group(1)) if named else 0
        if (owner if owner < world_size else 0) == rank:
            files.append(path)
    return files


def checkpoint_problem_on_any_rank(checkpoint: str | Path) -> str | None:
    """The first problem any rank finds in the files of `checkpoint` (see the module docstring)."""
    distributed = torch.distributed.is_initialized()
    rank, world_size = (
        (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    )
    files = files_to_check(Path(checkpoint), rank, world_size)
    problem = next(filter(None, map(file_problem, files)), None)
    if not distributed:
        return problem
    problems = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(problems, problem)
    return next(filter(None, problems), None)
