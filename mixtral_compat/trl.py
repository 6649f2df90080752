"""Every use of trl internals (private or undocumented names) in this project, in one place.

CHECKED is the range of trl versions these were checked against; `mixtral_compat.check_versions()`
refuses others at start-up with one line. Code elsewhere calls the functions here, never the
internals themselves.

Router terms (mixtral_tune/training/objective.py): SFTTrainer and DPOTrainer keep
- `aux_loss_enabled`: whether their `compute_loss` adds their own router term (and asks for router
  logits); `take_over_router_term` switches it off, so the model's objective is the only one;
- `_metrics[mode][name]`: lists TRL averages into each log; `log_metric` appends to them.

`add_fused_lm_head` (trl.trainer.utils, not exported): what SFTTrainer/DPOTrainer put on the model,
applied by bench/gpu_check to measure a step the way the trainers run it.
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


def take_over_router_term(trainer, metrics: str = "_metrics") -> None:
    """Switch off the router term a TRL trainer adds to its loss (and its logging of it); `metrics` is
    where the trainer keeps what it averages into each log (`_stored_metrics` for ORPO/CPO)."""
    if not hasattr(trainer, "aux_loss_enabled") or not isinstance(getattr(trainer, metrics, None), dict):
        raise unsupported(trainer, f"has no aux_loss_enabled/{metrics} to take the router terms over from")
    trainer.aux_loss_enabled = False


def log_metric(trainer, name: str, value: float) -> None:
    """Add `value` to what the trainer averages into its next log as `name` (train or eval, as the model is)."""
    trainer._metrics["train" if trainer.model.training else "eval"][name].append(value)


# ---------------------------------------------------------------------------------------------
# Training methods beyond SFT and DPO: KTOTrainer (stable) and ORPOTrainer / CPOTrainer (trl.experimental).
# What mixtral_tune/training/objective.py needs to know about how each computes its loss.

import sys  # noqa: E402  (this section's own imports; see above for the module's contract)

EXPERIMENTAL_PREFERENCE_TRAINERS = (
    ("trl.experimental.orpo", "ORPOTrainer"),
    ("trl.experimental.cpo", "CPOTrainer"),
)


def policy_forward_index(trainer) -> int:
    """Which forward of the policy's backbone inside one loss computation, counted from 0, is the one whose
    loss TRL trains (and whose router logits its own router term would use).

    KTOTrainer with a KL term (`calculate_KL`, loss_type=kto) first runs the policy without gradients on
    the mismatched KL completions (`_compute_kl_logps`), then on the batch; the reference forwards follow.
    Every other trainer runs the policy's training forward first.
    """
    from trl import KTOTrainer

    if isinstance(trainer, KTOTrainer):
        return 1 if trainer.calculate_KL else 0
    return 0


def computes_loss_in_batch_metrics(trainer) -> bool:
    """Whether `trainer` (ORPOTrainer, CPOTrainer) computes its loss in `get_batch_loss_metrics(model, batch,
    train_eval) -> (loss, metrics)`: its `compute_loss` (training) and its `prediction_step` (evaluation,
    which never calls compute_loss) both call it, and the returned metrics go through `store_metrics` into
    `_stored_metrics[train_eval]`, averaged into each log (keys prefixed `eval_` in evaluation).

    Only modules already imported are looked at: a trainer cannot be an instance of a class never imported,
    and importing trl.experimental warns.
    """
    classes = tuple(
        getattr(sys.modules[module], name)
        for module, name in EXPERIMENTAL_PREFERENCE_TRAINERS
        if module in sys.modules
    )
    return bool(classes) and isinstance(trainer, classes)


def add_fused_lm_head(model) -> None:
    """TRL's fused, chunked LM head on `model`, as SFTTrainer and DPOTrainer add it (before PEFT)."""
    from trl.trainer.utils import add_fused_lm_head as add

    add(model)
