"""Every use of trl internals (private or undocumented names) in this project, in one place.

CHECKED is the range of trl versions these were checked against; `mixtral_compat.check_versions()`
refuses others at start-up with one line. Code elsewhere calls the functions here, never the
internals themselves.
"""

PACKAGE = "trl"
CHECKED = ">=1.16,<1.17"


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
