"""Global-batch load balancing (Qiu et al., arXiv 2501.11873): the load-balancing loss formed with
the expert load fractions of the whole optimizer step -- every data-parallel rank and every
gradient-accumulation micro-batch -- instead of each micro-batch's own.

    load = use_global_batch_balance(model)   # the model's aux loss now uses `load`
    load.new_step()                           # at the first micro-batch of every optimizer step

What is computed, at micro-batch m of a step on rank r (A: (token, k) assignments per expert, S: sum of
router probabilities per expert, n: (layer, real token) rows routed; all from this forward):

1. one all-reduce (sum over the group's R ranks) of [A_E, S_E (detached), n]: 2E + 1 floats per
   micro-batch for all layers together, since the loss joins the layers as transformers' does;
2. those sums are added to the ones of the step's earlier micro-batches (counts only, no graph);
3. f_E = A_E(step so far) / n(step so far): the load fractions of every rank's micro-batches 1..m;
4. loss = E * sum_e f_e * (S_e / n) * (R * n / n_m), n_m being this micro-batch's rows on all ranks.

The factor R * n / n_m makes the mean over ranks (what DDP/DeepSpeed average gradients over) of the
loss and its gradient equal those of the concatenated micro-batch of all ranks, with any padding. At
the step's last micro-batch f is the global batch's; earlier micro-batches see the fractions of the
micro-batches forwarded so far (the later ones do not exist yet, and their gradients are already
taken). `step_loss()` is the loss of the whole step's batch from the accumulated sums (a value: it
equals transformers' `load_balancing_loss_func` on the concatenation of every rank's micro-batches).
Outside gradient mode (evaluation) each forward keeps its own fractions.

The group is every rank by default: under expert parallelism every rank routes its own tokens
(routing happens before dispatch), and the router is a dense parameter averaged over all ranks.
What ours adds to torch: the accumulation over micro-batches and the rank scale of step 4.
"""

import torch
import torch.distributed as dist


class GlobalBatchLoad:
    """The `global_load` of `mixtral_model.router_losses.load_balancing_loss` (see the module docstring)."""

    def __init__(self, num_experts: int, group=None):
        self.num_experts = num_experts
        self.group = group
        self.new_step()

    def new_step(self) -> None:
        """Forget the previous step's micro-batches."""
        self.sums = None  # [A_E, S_E, n] summed over ranks and the step's micro-batches so far
        self.micro_batches = 0

    def world_size(self) -> int:
        return dist.get_world_size(self.group) if dist.is_available() and dist.is_initialized() else 1

    def __call__(self, assignments_E, probs_E, routed):
        if not torch.is_grad_enabled():
            return None
        local = torch.cat([assignments_E.detach(), probs_E.detach(), routed.detach().reshape(1)]).float()
        summed = local.clone()
        world = self.world_size()
        if world > 1:
            dist.all_reduce(summed, group=self.group)
        self.sums = summed if self.sums is None else self.sums + summed
        self.micro_batches += 1
        E = self.num_experts
        tokens_per_expert_E = self.sums[:E] / self.sums[-1]
        scale = world * local[-1] / summed[-1]
        return tokens_per_expert_E, scale

    def step_loss(self) -> torch.Tensor | None:
        """E * sum_e f_e * P_e over every micro-batch of the step so far on every rank (a value)."""
        if self.sums is None:
            return None
        E = self.num_experts
        return E * torch.sum(self.sums[:E] * self.sums[E : 2 * E]) / self.sums[-1] ** 2


def use_global_batch_balance(model: torch.nn.Module, group=None) -> GlobalBatchLoad:
    """Make `model`'s load-balancing loss global-batch (PEFT or DeepSpeed wrappers are looked through);
    returns the state to call `new_step()` on at each optimizer step."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else getattr(model, "module", model)
    if not hasattr(base, "global_load"):
        raise TypeError(f"{type(base).__name__} has no global_load: global-batch balance is for our Mixtral")
    base.global_load = GlobalBatchLoad(base.config.num_local_experts, group)
    return base.global_load
