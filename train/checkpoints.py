"""Which checkpoint a run resumes from.

The HF Trainer writes `checkpoint-<step>/` in this order: model, optimizer and scheduler, RNG
states, then `trainer_state.json`, and only then deletes older checkpoints. A checkpoint is complete
when its `trainer_state.json` parses and names its own step, so one cut short by a crash or
`kill -9` is never chosen, and the previous complete one is still on disk.
"""

import json
from pathlib import Path

TRAINER_STATE = "trainer_state.json"


def checkpoint_step(path: Path) -> int | None:
    prefix, _, step = path.name.partition("-")
    return int(step) if prefix == "checkpoint" and step.isdigit() else None


def is_complete_checkpoint(path: Path) -> bool:
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return False
    return state.get("global_step") == checkpoint_step(path)


def latest_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The complete `checkpoint-<step>` directory with the highest step in output_dir, if any."""
    candidates = [
        (step, path)
        for path in Path(output_dir).glob("checkpoint-*")
        if (step := checkpoint_step(path)) is not None and is_complete_checkpoint(path)
    ]
    return str(max(candidates)[1]) if candidates else None


class ExpertParallelResumeMixin:
    """Put first in a trainer's bases: resumes a ZeRO-1/2 run under expert parallelism with every
    rank's own experts.

    DeepSpeed restores the model's parameters from one module-state file written by rank 0 (rank 0's
    experts, loaded by every rank; a full fine-tune fails its strict load on the other ranks, and with
    adapters those ranks kept their initial expert LoRA weights for one step: the first resumed loss
    was 1e-4 off), and each rank's fp32 master weights from its own optimizer file. So the module state
    is loaded leniently and then overwritten by the masters (`update_lp_params`, collective), as an
    optimizer step would. ZeRO-3 restores parameters from each rank's own partition: nothing to do.
    """

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        if resume_from_checkpoint is None or not self.is_expert_parallel_zero_1_or_2():
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        from transformers.integrations.deepspeed import deepspeed_load_checkpoint

        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, None)
        deepspeed_load_checkpoint(self.model_wrapped, resume_from_checkpoint, load_module_strict=False)
        self.model_wrapped.optimizer.update_lp_params()
        self._load_optimizer_and_scheduler(resume_from_checkpoint)  # the Trainer's own LR scheduler
        self._load_scaler(resume_from_checkpoint)
        return model, train_dataloader

    def is_expert_parallel_zero_1_or_2(self) -> bool:
        from deepspeed.moe.utils import is_moe_param  # here: train.config imports this module, DeepSpeed-free

        return (
            self.is_deepspeed_enabled
            and self.accelerator.state.deepspeed_plugin.zero_stage in (1, 2)
            and any(is_moe_param(p) for p in self.model.parameters())
        )
