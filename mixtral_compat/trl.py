"""Every use of trl internals (private or undocumented names) in this project, in one place.

CHECKED is the range of trl versions these were checked against; `mixtral_compat.check_versions()`
refuses others at start-up with one line. Code elsewhere calls the functions here, never the
internals themselves.

Router terms (mixtral_tune/training/objective.py): SFTTrainer and DPOTrainer keep
- `aux_loss_enabled`: whether their `compute_loss` adds their own router term (and asks for router
  logits); `take_over_router_term` switches it off, so the model's objective is the only one;
- `_metrics[mode][name]`: lists TRL averages into each log; `log_metric` appends to them.
"""

PACKAGE = "trl"
CHECKED = ">=1.16,<1.17"


def unsupported(trainer, what: str) -> RuntimeError:
    """The error for a TRL trainer that no longer has the shape this module was written for."""
    import trl

    return RuntimeError(
        f"trl {trl.__version__}: {type(trainer).__name__} {what}; mixtral_compat/trl.py is written for "
        f"{PACKAGE}{CHECKED}"
    )


def take_over_router_term(trainer) -> None:
    """Switch off the router term a TRL trainer adds to its loss (and its logging of it)."""
    if not hasattr(trainer, "aux_loss_enabled") or not isinstance(getattr(trainer, "_metrics", None), dict):
        raise unsupported(trainer, "has no aux_loss_enabled/_metrics to take the router terms over from")
    trainer.aux_loss_enabled = False


def log_metric(trainer, name: str, value: float) -> None:
    """Add `value` to what the trainer averages into its next log as `name` (train or eval, as the model is)."""
    trainer._metrics["train" if trainer.model.training else "eval"][name].append(value)
