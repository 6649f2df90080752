"""Every use of transformers internals (private or undocumented names) in this project, in one place.

CHECKED is the range of transformers versions these were checked against; `mixtral_compat.check_versions()`
refuses others at start-up with one line. Code elsewhere calls the functions here, never the
internals themselves.

Model side (`PreTrainedModelHooks`, a base of our `MixtralPreTrainedModel`; `attn_implementation`):
- `PreTrainedModel._load_pretrained_model` (a staticmethod, called by `from_pretrained` after the model
  is built on the meta device and before any weight is read) runs the model's public hook
  `before_weights_are_read()` first: the step where expert parallelism is applied, so each rank reads
  only its own experts. `from_pretrained` has no argument or public hook that reaches that moment.
- `PreTrainedModel._check_and_adjust_attn_implementation` answers with the model's public
  `checked_attn_implementation(requested)`: our attention has its own backends, not transformers'
  registry (which would also try hub kernels).
- `config._attn_implementation`: the backend transformers settled on (no public accessor).
- `config._experts_implementation`: the MoE experts backend transformers' own Mixtral settled on
  (`experts_implementation`; bench/gpu_check reports it beside its timings).
- `PreTrainedModel._init_weights(module)`: the model's initialisation rule for one module
  (`init_module_weights`; bench/gpu_check initialises a model piece by piece as it materialises it).

Trainer side (`TrainerCheckpointHooks`, `load_trainer_schedule`):
- `Trainer._save_checkpoint` runs with `args.save_total_limit` held back (the Trainer would rotate
  inside it), then calls the trainer's public `checkpoint_saved(save_total_limit)`.
- `Trainer._prepare_for_training` (wraps the model, DeepSpeed engine included, and loads a checkpoint's
  model and optimizer states) gives a trainer whose public `restores_checkpoint_itself(checkpoint)` is
  true the wrapped model without the checkpoint, then calls its `restore_checkpoint(checkpoint)`.
- `Trainer._load_optimizer_and_scheduler` and `Trainer._load_scaler`: what that restore reuses of the
  Trainer's own loading (the learning-rate scheduler and the grad scaler).
"""

PACKAGE = "transformers"
CHECKED = ">=5.24,<5.26"


class PreTrainedModelHooks:
    """Put before `PreTrainedModel` in a model's bases; the model defines `before_weights_are_read()`
    and `checked_attn_implementation(requested)`."""

    @staticmethod
    def _load_pretrained_model(model, state_dict, checkpoint_files, load_config, expected_keys=None):
        from transformers import PreTrainedModel

        model.before_weights_are_read()
        return PreTrainedModel._load_pretrained_model(
            model, state_dict, checkpoint_files, load_config, expected_keys
        )

    def _check_and_adjust_attn_implementation(
        self, attn_implementation, is_init_check=False, **kwargs
    ) -> str:
        return self.checked_attn_implementation(attn_implementation)


def attn_implementation(config) -> str:
    """The attention backend a model's config names (set through `attn_implementation=` when loading)."""
    return config._attn_implementation


def experts_implementation(config) -> str | None:
    """The experts backend transformers' MoE models run (set through `experts_implementation=`)."""
    return config._experts_implementation


def init_module_weights(model, module) -> None:
    """Initialise one module of `model` by the model's own rule (what `post_init` applies to every module)."""
    model._init_weights(module)


class TrainerCheckpointHooks:
    """Put before the Trainer in a trainer's bases; the trainer defines
    `checkpoint_saved(save_total_limit)`, `resuming(max_steps)`, `restores_checkpoint_itself(checkpoint)
    -> bool` and `restore_checkpoint(checkpoint)`."""

    def _save_checkpoint(self, model, trial):
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.checkpoint_saved(limit)

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        if resume_from_checkpoint is not None:
            self.resuming(max_steps)
        if resume_from_checkpoint is None or not self.restores_checkpoint_itself(resume_from_checkpoint):
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, None)
        self.restore_checkpoint(resume_from_checkpoint)
        return model, train_dataloader


def load_trainer_schedule(trainer, checkpoint: str) -> None:
    """The Trainer's own loading of a checkpoint's learning-rate scheduler (and optimizer, where the
    Trainer owns it) and grad scaler."""
    trainer._load_optimizer_and_scheduler(checkpoint)
    trainer._load_scaler(checkpoint)


def planned_optimizer_steps(trainer) -> int:
    """The optimizer steps `trainer.train()` will run in all (max_steps, or the epochs over its data), as
    the Trainer computes them: `Trainer.set_initial_training_values` (public, undocumented)."""
    return trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[-1]


def load_checkpoint_weights(trainer, checkpoint: str) -> None:
    """The model weights (or adapter) and trainer state of `checkpoint`, without training: the Trainer's
    own loader (`Trainer._load_from_checkpoint`, private); not for DeepSpeed, whose engine loads them."""
    from transformers.trainer_callback import TrainerState

    trainer._load_from_checkpoint(checkpoint)
    trainer.state = TrainerState.load_from_json(f"{checkpoint}/trainer_state.json")
