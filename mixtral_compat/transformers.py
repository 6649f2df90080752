"""Every use of transformers internals (private or undocumented names) in this project, in one place.

CHECKED is the range of transformers versions these were checked against; `mixtral_compat.check_versions()`
refuses others at start-up with one line. Code elsewhere calls the functions here, never the
internals themselves.
"""

PACKAGE = "transformers"
CHECKED = ">=5.24,<5.26"


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
