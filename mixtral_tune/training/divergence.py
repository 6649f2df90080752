"""A diverging run stops: a non-finite loss, gradient norm or trainable weight ends training at the
step it appears, before any checkpoint or `final/` is written from it.

transformers' Trainer trains on through NaN (and, with `logging_nan_inf_filter`, logs an average of
the finite losses instead, 0 when none is). What this adds, through the public `TrainerCallback` API:

* after every optimizer step, the trainable weights are checked finite (on every rank, each its own
  parameters or ZeRO-3 partition, agreed by one all-reduce so every rank stops at the same step);
  a step whose weights went non-finite is logged (the console and log history show the NaN loss
  or gradient norm) and not saved;
* every training log is checked: a non-finite loss, or a non-finite gradient norm on a step the
  optimizer took (a mixed-precision scaler that skipped the step, as it intends on overflow, is not
  divergence), stops training and cancels the save of that step;
* the pipeline (mixtral_tune/pipeline.py) then exits non-zero with one line naming the step and the
  values, and never writes `final/`; the last checkpoint saved before stays.
"""

import math

import torch
from transformers import TrainerCallback

from mixtral_compat.deepspeed import local_parameter_data


def trainable_weights_finite(model: torch.nn.Module) -> bool:
    """Whether every trainable parameter value on every rank is finite: one float32 sum per parameter
    (a NaN or inf makes it non-finite; no copy of the parameter is made), summed over the ranks."""
    per_device = {}  # one sum per device, read back once each
    for param in model.parameters():
        data = local_parameter_data(param)
        if param.requires_grad and data.numel():
            total = data.detach().sum(dtype=torch.float32)
            per_device[total.device] = per_device.get(total.device, 0) + total
    total = sum((value.cpu() for value in per_device.values()), torch.zeros(()))
    if torch.distributed.is_initialized():
        if torch.distributed.get_backend() == "nccl":
            total = total.cuda()
        torch.distributed.all_reduce(total)
    return bool(torch.isfinite(total))


def is_finite_number(value) -> bool:
    return not isinstance(value, int | float) or math.isfinite(value)


class DivergenceCallback(TrainerCallback):
    """Stops training at the first non-finite loss, gradient norm or trainable weight (see module doc).

    `stopped` holds one line naming the step and the values once it has stopped, else None.
    """

    def __init__(self):
        self.stopped: str | None = None
        self.weights_step: int | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not trainable_weights_finite(model):
            self.weights_step = state.global_step
            self.stopped = f"step {state.global_step}: the trainable weights are no longer all finite"
            control.should_log = True  # the step's loss and gradient norm go to the console and log history
            self.stop(control)
        return control

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        shown = {key: (logs or {})[key] for key in ("loss", "grad_norm") if key in (logs or {})}
        if not shown:  # an evaluation or the end-of-training summary
            return control
        skipped = bool(getattr(optimizer, "step_was_skipped", False))  # accelerate's scaler skip
        diverged = [
            key
            for key, value in shown.items()
            if not is_finite_number(value) and not (key == "grad_norm" and skipped)
        ]
        if diverged or self.weights_step == state.global_step:
            named = ", ".join(f"{key}={value:.6g}" for key, value in shown.items())
            weights = f"; {self.stopped.split(': ', 1)[1]}" if self.weights_step == state.global_step else ""
            self.stopped = f"step {state.global_step}: {named}{weights}"
            self.stop(control)
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped:
            self.stop(control)
        return control

    @staticmethod
    def stop(control) -> None:
        control.should_training_stop = True
        control.should_save = False
        control.should_evaluate = False
