"""Checkpoints a run can resume from, and the trainer side of resuming.

The HF Trainer writes `checkpoint-<step>/` in this order: model, optimizer and scheduler (each rank
its own DeepSpeed shard), RNG states (each rank its own), then `trainer_state.json`. `ResumeMixin`
then waits for every rank, writes `checkpoint_complete.json` last (every file of the checkpoint with
its size), and only then deletes checkpoints beyond `save_total_limit`, so a complete checkpoint is on
disk at every moment. (A TrainerCallback's `on_save` comes too late for that: the Trainer rotates
inside its save, before the marker could exist; `mixtral_compat.transformers.TrainerCheckpointHooks`
holds the rotation back.) A checkpoint is complete when its marker is there, its `trainer_state.json`
names its own step, and every file the marker lists is there with that size: one cut short by a
crash or `kill -9` (or a file truncated afterwards) is never chosen, and `resume=true` takes the
newest complete one, naming each newer one it skipped and why.
"""

import copy
import json
import os
import sys
from pathlib import Path

import torch
from transformers.trainer import TRAINING_ARGS_NAME

from mixtral_compat.deepspeed import copy_master_weights_to_model
from mixtral_compat.transformers import TrainerCheckpointHooks, load_trainer_schedule

TRAINER_STATE = "trainer_state.json"
COMPLETE_MARKER = "checkpoint_complete.json"


def checkpoint_step(path: Path) -> int | None:
    prefix, _, step = path.name.partition("-")
    return int(step) if prefix == "checkpoint" and step.isdigit() else None


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be resumed from (one line), or None when it is complete."""
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return f"no readable {TRAINER_STATE} (cut short before it was written)"
    if state.get("global_step") != checkpoint_step(path):
        return f"{TRAINER_STATE} names step {state.get('global_step')}, not {checkpoint_step(path)}"
    try:
        files = json.loads((path / COMPLETE_MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {COMPLETE_MARKER} (cut short before every rank had written its part)"
    return listed_files_problem(path, files)


def listed_files_problem(directory: Path, files: dict[str, int]) -> str | None:
    """The first of `files` (name -> size when saved, as a completeness marker lists them) that is
    missing from `directory`, has another size, or cannot be opened; None when every one is sound."""
    for name, size in files.items():
        file = directory / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} when it was saved (cut short)"
        problem = unreadable_header(file)
        if problem:
            return f"{name} {problem}"
    return None


def unreadable_header(file: Path) -> str | None:
    """Why a weights or state file cannot be opened (its header or index garbled), or None.

    Reads headers only: a safetensors file's JSON header, a torch.save file's zip index. Whether the
    contents load safely is for the loaders to decide."""
    import zipfile

    from safetensors import SafetensorError, safe_open

    if file.suffix == ".safetensors":
        try:
            with safe_open(file, framework="pt"):
                return None
        except (SafetensorError, OSError) as error:
            return f"has an unreadable header ({str(error).splitlines()[0]})"
    if file.suffix in (".pt", ".pth", ".bin"):
        try:
            with zipfile.ZipFile(file):
                return None
        except (zipfile.BadZipFile, OSError) as error:
            return f"is not a readable torch.save file ({error})"
    return None


def is_complete_checkpoint(path: Path) -> bool:
    return checkpoint_problem(Path(path)) is None


def latest_complete_checkpoint(output_dir: str | Path, warn: bool = False) -> str | None:
    """The complete `checkpoint-<step>` directory with the highest step in output_dir, if any.
    warn: print one line to stderr (from the first rank only) for each newer checkpoint skipped."""
    checkpoints = sorted(
        ((step, path) for path in Path(output_dir).glob("checkpoint-*") if (step := checkpoint_step(path))
         is not None),
        reverse=True,
    )  # fmt: skip
    for _, path in checkpoints:
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        if warn and int(os.environ.get("RANK", "0")) == 0:
            print(f"warning: skipping incomplete checkpoint {path}: {problem}", file=sys.stderr, flush=True)
    return None


def mark_checkpoint_complete(path: Path) -> None:
    """Write `path/checkpoint_complete.json` (every file under path with its size), atomically, last."""
    write_completeness_marker(path, COMPLETE_MARKER, global_step=checkpoint_step(path))


def write_completeness_marker(directory: Path, marker: str, **fields) -> None:
    """`directory/marker`: `fields` and every file under `directory` with its size (what
    `listed_files_problem` checks), written atomically; write it last."""
    files = {
        str(file.relative_to(directory)): file.stat().st_size
        for file in sorted(directory.rglob("*"))
        if file.is_file() and file.name != marker
    }
    partial = directory / f".{marker}.partial"
    partial.write_text(json.dumps({**fields, "files": files}, indent=1))
    os.replace(partial, directory / marker)


def keep_environment_out_of_saved_args(args, from_environment: dict[str, str], directory: Path) -> None:
    """training_args.bin (the Trainer's pickled arguments) with every trainer.* value read from the
    environment written as its `${oc.env:...}` source, as run_config.yaml keeps it
    (`config.trainer_keys_read_from_env`); never read back on resume."""
    if from_environment and (directory / TRAINING_ARGS_NAME).exists():
        saved = copy.copy(args)  # not dataclasses.replace: a new TrainingArguments resets accelerate's state
        for key, value in from_environment.items():
            setattr(saved, key, value)
        torch.save(saved, directory / TRAINING_ARGS_NAME)


class ResumeMixin(TrainerCheckpointHooks):
    """Put first in a trainer's bases: checkpoints marked complete once every rank has written its
    part, and resume of ZeRO-1/2 runs under expert parallelism with every rank's own experts.

    DeepSpeed ZeRO-1/2 restores the model's parameters from one module-state file written by rank 0
    (rank 0's experts, loaded by every rank: a full fine-tune fails its strict load on the other
    ranks, and with adapters those ranks kept their initial expert LoRA weights for one step, so the
    first resumed losses drifted) and each rank's fp32 master weights from its own optimizer file.
    So under expert parallelism the module state is loaded leniently and then overwritten by the
    masters (`mixtral_compat.deepspeed.copy_master_weights_to_model`, collective), as an optimizer step
    would. ZeRO-3 restores parameters from each rank's own partition and needs nothing.
    """

    def checkpoint_saved(self, save_total_limit: int | None) -> None:
        """After the Trainer saved `checkpoint-<step>` (rotation held back): mark it, then rotate."""
        from transformers.trainer_utils import rotate_checkpoints

        self.accelerator.wait_for_everyone()  # every rank's optimizer shard and RNG state are written
        if self.args.should_save:
            checkpoint = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            keep_environment_out_of_saved_args(
                self.args, getattr(self, "args_from_environment", {}), checkpoint
            )
            mark_checkpoint_complete(checkpoint)
            rotate_checkpoints(
                self.args.output_dir, save_total_limit, self.state.best_model_checkpoint, use_mtime=True
            )

    def resuming(self, max_steps: int) -> None:
        """Before a resume: the Trainer keeps the checkpoint's logging/eval/save cadence (its
        trainer_state.json); a resume that changed them (recorded in run_config_history.yaml) runs at
        the new ones."""
        self.state.compute_steps(self.args, max_steps)

    def restores_checkpoint_itself(self, checkpoint: str) -> bool:
        return self.is_expert_parallel_zero_1_or_2()

    def restore_checkpoint(self, checkpoint: str) -> None:
        """After the Trainer wrapped the model (without loading `checkpoint`): DeepSpeed's module state
        leniently, every rank's fp32 masters over it, then the Trainer's LR scheduler and scaler."""
        from transformers.integrations.deepspeed import deepspeed_load_checkpoint

        deepspeed_load_checkpoint(self.model_wrapped, checkpoint, load_module_strict=False)
        copy_master_weights_to_model(self.model_wrapped)
        load_trainer_schedule(self, checkpoint)

    def is_expert_parallel_zero_1_or_2(self) -> bool:
        """`expert_parallel`: the layout the trainer was given (trainers.ExpertParallelSaveMixin)."""
        return (
            self.is_deepspeed_enabled
            and self.accelerator.state.deepspeed_plugin.zero_stage in (1, 2)
            and self.expert_parallel is not None
        )
