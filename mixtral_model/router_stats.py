"""Per-layer router statistics for the training logger, from the router logits a forward returns.

    out = model(**batch, output_router_logits=True)
    logs = router_statistics(out.router_logits, config.num_experts_per_tok, batch["attention_mask"],
                             capacity_factor=config.expert_capacity_factor)

Flat keys, python floats, padding tokens left out (attention_mask 0):
- `router/layer_L/expert_E_fraction`: expert E's share of layer L's (token, k) assignments (sums to 1
  over E; 1/num_experts is perfectly balanced);
- `router/layer_L/entropy`: mean entropy (nats) of the router's softmax over experts;
- `router/layer_L/aux_loss`, `router/layer_L/z_loss`: the load-balancing loss and z-loss of layer L alone;
- `router/layer_L/dropped_fraction` (only with a capacity factor): share of assignments dropped for
  capacity, with the block's rule (every token of the batch, padding too, competes for capacity);
- summaries: `router/entropy`, `router/z_loss`, `router/dropped_fraction` (means over layers),
  `router/aux_loss` (over all layers jointly, as the model's `aux_loss`), `router/max_expert_load`
  (the busiest expert's fraction times num_experts, max over layers: 1 = balanced).
Under expert parallelism each rank's numbers describe its own tokens. The cost is one softmax and
top-k per layer and a single device-to-host copy.
"""

import torch
import torch.nn.functional as F

from .moe import expert_capacity, plan_slots
from .router_losses import token_weights


def dropped_slots(experts_NK: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """(N, K) bool: the slots the MoE block drops for this capacity."""
    plan = plan_slots(experts_NK, num_experts, capacity)
    dropped_S = torch.ones(experts_NK.numel(), dtype=torch.bool, device=experts_NK.device)
    dropped_S[plan.slot_order_M] = False
    return dropped_S.view_as(experts_NK)


def router_statistics(
    router_logits: tuple[torch.Tensor, ...],
    top_k: int,
    attention_mask_BT: torch.Tensor | None = None,
    capacity_factor: float | None = None,
) -> dict[str, float]:
    """Statistics of every layer's routing (see the module docstring for the keys)."""
    logits_LNE = torch.stack([logits.detach().float() for logits in router_logits])
    num_layers, num_tokens, num_experts = logits_LNE.shape
    weight_N = token_weights(attention_mask_BT, num_tokens, logits_LNE.device)
    real_tokens = weight_N.sum().clamp(min=1.0)

    probs_LNE = F.softmax(logits_LNE, dim=-1)
    _, experts_LNK = torch.topk(probs_LNE, top_k, dim=-1)
    assignments_LNE = F.one_hot(experts_LNK, num_experts).sum(dim=2).float()
    tokens_per_expert_LE = torch.einsum("lne,n->le", assignments_LNE, weight_N) / real_tokens  # sums to top_k
    prob_per_expert_LE = torch.einsum("lne,n->le", probs_LNE, weight_N) / real_tokens
    fraction_LE = tokens_per_expert_LE / top_k
    entropy_L = torch.einsum("lne,n->l", torch.special.entr(probs_LNE), weight_N) / real_tokens
    aux_loss_L = num_experts * (tokens_per_expert_LE * prob_per_expert_LE).sum(dim=-1)
    z_loss_L = torch.einsum("ln,n->l", torch.logsumexp(logits_LNE, dim=-1).pow(2), weight_N) / real_tokens

    stats: dict[str, torch.Tensor] = {}
    for layer in range(num_layers):
        prefix = f"router/layer_{layer}"
        for expert in range(num_experts):
            stats[f"{prefix}/expert_{expert}_fraction"] = fraction_LE[layer, expert]
        stats[f"{prefix}/entropy"] = entropy_L[layer]
        stats[f"{prefix}/aux_loss"] = aux_loss_L[layer]
        stats[f"{prefix}/z_loss"] = z_loss_L[layer]
    stats["router/entropy"] = entropy_L.mean()
    stats["router/aux_loss"] = num_experts * (tokens_per_expert_LE.mean(0) * prob_per_expert_LE.mean(0)).sum()
    stats["router/z_loss"] = z_loss_L.mean()
    stats["router/max_expert_load"] = fraction_LE.max() * num_experts
    if capacity_factor is not None:
        capacity = expert_capacity(num_tokens, top_k, num_experts, capacity_factor)
        dropped_L = torch.stack(
            [
                torch.einsum(
                    "nk,n->", dropped_slots(experts_LNK[layer], num_experts, capacity).float(), weight_N
                )
                for layer in range(num_layers)
            ]
        ) / (real_tokens * top_k)
        for layer in range(num_layers):
            stats[f"router/layer_{layer}/dropped_fraction"] = dropped_L[layer]
        stats["router/dropped_fraction"] = dropped_L.mean()
    values = torch.stack(list(stats.values())).tolist()
    return dict(zip(stats, values, strict=True))


def routing_drift(
    base_logits: tuple[torch.Tensor, ...],
    tuned_logits: tuple[torch.Tensor, ...],
    top_k: int,
    attention_mask_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """How the routing of the same tokens moved from `base_logits` to `tuned_logits` (each a tuple of
    (N, E) per layer): (changed_L, kl_L, real tokens), with changed_L the number of real tokens whose
    set of top_k experts differs (order ignored) and kl_L the sum over real tokens of
    KL(base || tuned) of the router softmax, in nats. Sums, so batches and ranks add up."""
    base_LNE = torch.stack([logits.detach().float() for logits in base_logits])
    tuned_LNE = torch.stack([logits.detach().float() for logits in tuned_logits])
    weight_N = token_weights(attention_mask_BT, base_LNE.shape[1], base_LNE.device)
    base_experts_LNK = torch.topk(base_LNE, top_k, dim=-1).indices.sort(dim=-1).values
    tuned_experts_LNK = torch.topk(tuned_LNE, top_k, dim=-1).indices.sort(dim=-1).values
    changed_LN = (base_experts_LNK != tuned_experts_LNK).any(dim=-1).float()
    base_log_LNE, tuned_log_LNE = F.log_softmax(base_LNE, -1), F.log_softmax(tuned_LNE, -1)
    kl_LN = (base_log_LNE.exp() * (base_log_LNE - tuned_log_LNE)).sum(dim=-1)
    return changed_LN @ weight_N, kl_LN @ weight_N, weight_N.sum()
