"""The trainer classes of the pipelines: one stack of mixins over each TRL trainer.

    MixtralSFTTrainer = mixtral_trainer(trl.SFTTrainer)
    MixtralDPOTrainer = mixtral_trainer(trl.DPOTrainer)

Every stage trains through the same stack, outermost first (each mixin calls `super()`):

1. `ResumeMixin` (training/resume.py): marks a checkpoint complete once every rank wrote its part;
   resumes ZeRO-1/2 expert-parallel runs with every rank's own experts.
2. `ExpertParallelSaveMixin` (here): under expert parallelism every save gathers all experts into one
   complete hub checkpoint or adapter.
3. `RouterStatsLoggingMixin` (training/reporting.py): router statistics in every training log.
4. `RouterObjectiveMixin` (training/objective.py): the router's aux and z terms added to TRL's loss.
5. `DeepSpeedMoETrainerMixin` (here): MoE parameter groups in the optimizer DeepSpeed is given.

`NoOutputDirModelCardMixin` (here) keeps TRL's model card out of `output_dir` (ours is in `final/`).

Upgrade hazards: the stack overrides Trainer methods whose names and signatures are not public API
and can change in any transformers or TRL release -- `_save_checkpoint` and `_prepare_for_training`
(resume; they live in `mixtral_compat.transformers.TrainerCheckpointHooks`, which also calls
`_load_optimizer_and_scheduler` and `_load_scaler`) -- and the public `compute_loss` (objective;
TRL's `aux_loss_enabled`/`_metrics` through `mixtral_compat.trl`), `save_model` (passes every argument
on) and `create_optimizer`. `mixtral_compat` holds every such internal with the versions it was checked
on, refuses others at start-up, and tests/test_compat.py fails when one changes shape.
"""

from pathlib import Path

import torch
from peft import PeftModel
from transformers.trainer import TRAINING_ARGS_NAME

from mixtral_parallel.deepspeed_moe import gathered_state_dict, moe_optimizer
from mixtral_parallel.expert_parallel import ExpertParallelGroups, check_expert_parallel_layout
from mixtral_parallel.expert_state import save_expert_parallel_adapter
from mixtral_tune.training.objective import RouterObjectiveMixin
from mixtral_tune.training.reporting import RouterStatsLoggingMixin
from mixtral_tune.training.resume import ResumeMixin


class ExpertParallelSaveMixin:
    """Under expert parallelism every rank holds different experts: each save (checkpoints and the
    final model) gathers them into one complete hub checkpoint through the model's collective
    save_pretrained -- or, for a PEFT model, into one complete adapter holding every expert's
    lora_A/lora_B -- instead of rank 0 writing only its own.

    `expert_parallel=` (a constructor argument): the groups the model was made expert-parallel with
    (None: it was not), checked against the model once, here."""

    def __init__(self, *args, expert_parallel: ExpertParallelGroups | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        check_expert_parallel_layout(self.model, expert_parallel)
        self.expert_parallel = expert_parallel

    def save_model(self, output_dir=None, *args, **kwargs):
        if self.expert_parallel is None:
            return super().save_model(output_dir, *args, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        output_dir = output_dir or self.args.output_dir
        if isinstance(model, PeftModel):
            save_expert_parallel_adapter(
                model, self.expert_parallel, output_dir, gathered_state_dict(model, trainable_only=True)
            )
        else:
            model.save_pretrained(output_dir, state_dict=gathered_state_dict(model))
        if self.args.should_save:  # what HF Trainer._save writes beside the weights
            torch.save(self.args, Path(output_dir) / TRAINING_ARGS_NAME)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)


class DeepSpeedMoETrainerMixin:
    """The optimizer the Trainer builds for DeepSpeed (no `optimizer` block in the DeepSpeed config)
    gets MoE parameter groups."""

    def create_optimizer(self, model=None):
        self.optimizer = moe_optimizer(super().create_optimizer(model))
        return self.optimizer


class NoOutputDirModelCardMixin:
    """TRL's trainers write their own `README.md` model card into `output_dir` at every checkpoint
    save (`create_model_card`), over any file of that name the user keeps there; the pipelines write
    theirs into `final/` (mixtral_tune/model_card.py), so TRL's is not written."""

    def create_model_card(self, *args, **kwargs):
        return None


STACK = (
    ResumeMixin,
    NoOutputDirModelCardMixin,
    ExpertParallelSaveMixin,
    RouterStatsLoggingMixin,
    RouterObjectiveMixin,
    DeepSpeedMoETrainerMixin,
)


def mixtral_trainer(base: type) -> type:
    """`base` (a TRL trainer class) under the stack above, named `Mixtral<base name>`."""
    return type(f"Mixtral{base.__name__}", (*STACK, base), {"__module__": __name__, "__doc__": __doc__})
