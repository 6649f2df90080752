"""The objective every pipeline trains: TRL's loss plus the model's router terms.

TRL's SFTTrainer and DPOTrainer patch the model with `trl.trainer.utils.add_fused_lm_head`: their
`compute_loss` calls `model(..., fused_lm_head=True)`, which runs the backbone and scores the labels
in chunks, never building the (B, T, V) logits. On that path they add their own router term
(transformers' `load_balancing_loss_func` times their copy of the coefficient) and no z-loss.

`RouterObjectiveMixin` keeps TRL's fused head and loss (SFT: next-token NLL; DPO: the preference
loss) and makes the model the one owner of the router terms:

- TRL's router term is switched off, and TRL's own coefficient (`router_aux_loss_coef` in
  SFTConfig/DPOConfig) must be left unset: the coefficients come from the model config only;
- a forward hook on the policy's backbone keeps the router logits of the policy forward in each
  `compute_loss`; `MixtralForCausalLM.router_objective` (the method the model's own
  `forward(labels=...)` adds) turns them into aux_coef * aux + z_coef * z, added to TRL's loss;
- the aux and z values of that objective are logged as `aux_loss` and `z_loss`, averaged over the
  same micro-batches as TRL's other metrics. The DPO reference adds nothing.

The same holds for the other TRL trainers (mixtral_compat/trl.py says how each computes its loss):
KTOTrainer (fused head, as DPO) runs the policy twice per batch when it estimates its KL term, first
without gradients on mismatched completions: the router terms are those of the second, trained forward,
as TRL's own term would be. ORPOTrainer and CPOTrainer (SimPO: loss_type=simpo) compute the full logits
in `get_batch_loss_metrics`, which both training and evaluation call: the router terms are added there
(to the loss as it leaves that method, so the Trainer scales them for accumulation exactly as it scales
TRL's loss and TRL's own router term) and logged through the metrics it returns.

What this leans on in TRL (the range in mixtral_compat/trl.py; each is checked and a mismatch raises):
`add_fused_lm_head`'s forward calls the backbone `model.base_model` through `__call__` (so forward
hooks run) and computes a router term only when `config.output_router_logits` is true; in
`compute_loss` the policy's forward comes first (DPO runs the reference after it, or not at all with
precomputed reference log-probs). The trainers' internal switch for their router term and their
metric lists are reached through `mixtral_compat.trl`. The accumulation scaling follows the Trainer's
documented `loss_is_scaled_for_ga`.
"""

from contextlib import contextmanager

import torch

from mixtral_compat import trl as trl_compat
from mixtral_compat.trl import log_metric, take_over_router_term, unsupported


class PolicyRouterLogits:
    """Router logits and attention mask of the `index`-th forward (from 0) of `backbone` inside `policy_forward()`."""

    def __init__(self, backbone: torch.nn.Module, index: int = 0):
        self.armed = False
        self.captured = None
        self.index, self.seen = index, 0
        backbone.register_forward_hook(self._keep, with_kwargs=True)

    def _keep(self, module, args, kwargs, output) -> None:
        if self.armed:
            if self.seen == self.index:
                self.captured = (output.router_logits, kwargs.get("attention_mask"), torch.is_grad_enabled())
            self.seen += 1

    @contextmanager
    def policy_forward(self):
        self.armed, self.captured, self.seen = True, None, 0
        try:
            yield
        finally:
            self.armed = False


class RouterObjectiveMixin:
    """Put before a TRL trainer (SFT, DPO, KTO, ORPO, CPO) in a trainer's bases (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        trl_coef = getattr(self.args, "router_aux_loss_coef", None)  # ORPOConfig/CPOConfig have none
        if trl_coef is not None:
            raise ValueError(
                f"router_aux_loss_coef={trl_coef} in the TRL config is a second road "
                "for the aux-loss coefficient: leave it unset and set model.router_aux_loss_coef"
            )
        self.loss_in_batch_metrics = trl_compat.computes_loss_in_batch_metrics(self)
        # TRL adds no router term and requests no router logits
        take_over_router_term(self, "_stored_metrics" if self.loss_in_batch_metrics else "_metrics")
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        if not hasattr(model, "router_objective"):
            raise TypeError(
                f"{type(model).__name__} has no router_objective; the pipelines train our Mixtral"
            )
        for each in (model, getattr(self, "ref_model", None)):
            each = getattr(each, "module", each)  # under DeepSpeed, TRL wraps the reference in an engine
            if each is not None:  # TRL's fused head computes a router term only when this is true
                each.config.output_router_logits = False
        self.policy = model
        self.policy_router_logits = PolicyRouterLogits(
            model.base_model, trl_compat.policy_forward_index(self)
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.loss_in_batch_metrics:  # ORPO/CPO: added in get_batch_loss_metrics, which evaluation runs too
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        with self.policy_router_logits.policy_forward():
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        router_loss, aux_loss, z_loss = self._policy_router_objective("compute_loss")
        for key, value in self._router_metrics(aux_loss, z_loss).items():
            log_metric(self, key, value)
        router_loss = router_loss / self._accumulation_divisor(num_items_in_batch)
        if return_outputs:
            loss, outputs = result
            return loss + router_loss.to(loss.device), outputs
        return result + router_loss.to(result.device)

    def get_batch_loss_metrics(self, model, batch, train_eval="train"):
        """ORPO and CPO: (TRL's loss + the router terms, TRL's metrics + aux_loss/z_loss). The router terms are
        in the loss compute_loss returns, so the Trainer divides them for accumulation as it divides TRL's."""
        with self.policy_router_logits.policy_forward():
            loss, metrics = super().get_batch_loss_metrics(model, batch, train_eval)
        router_loss, aux_loss, z_loss = self._policy_router_objective("get_batch_loss_metrics")
        prefix = "eval_" if train_eval == "eval" else ""
        metrics.update({prefix + key: value for key, value in self._router_metrics(aux_loss, z_loss).items()})
        return loss + router_loss.to(loss.device), metrics

    def _policy_router_objective(self, where: str):
        """(weighted router terms, aux, z) of the policy forward captured while TRL computed its loss."""
        captured = self.policy_router_logits.captured
        if captured is None:
            raise unsupported(
                self, f"{where} ran no forward #{self.policy_router_logits.index} of the policy's backbone"
            )
        router_logits, attention_mask, with_grad = captured
        if self.model.training and not with_grad:
            raise unsupported(
                self,
                f"{where}'s forward #{self.policy_router_logits.index} ran without gradients (not the policy's)",
            )
        return self.policy.router_objective(router_logits, attention_mask)

    def _accumulation_divisor(self, num_items_in_batch) -> int:
        """The router terms are a mean per micro-batch. Trainer.training_step divides the loss by the
        accumulation steps unless compute_loss already scaled it for them (SFT with
        num_items_in_batch); then they are divided here, so they are averaged over micro-batches."""
        if not self.model.training:
            return 1
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:  # Trainer.training_step's own rule
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        return self.current_gradient_accumulation_steps if scaled else 1

    def _router_metrics(self, aux_loss, z_loss) -> dict[str, float]:
        """Each enabled term as it entered the objective, averaged over ranks; TRL averages them into each log."""
        metrics = {}
        if self.policy.config.router_aux_loss_coef != 0:
            metrics["aux_loss"] = self.accelerator.gather_for_metrics(aux_loss.detach()).mean().item()
        if z_loss is not None:
            metrics["z_loss"] = self.accelerator.gather_for_metrics(z_loss.detach()).mean().item()
        return metrics
