"""Router losses: Switch-Transformer load balancing (as transformers' `load_balancing_loss_func`)
and the ST-MoE router z-loss. Both skip padding tokens when an attention mask is given.

The load-balancing loss is formed from per-expert sums (`expert_load_sums`); a `global_load` callable
may replace this forward's load fractions by those of a larger batch (global-batch balancing, applied
from outside: mixtral_parallel/global_balance.py). Without it the loss is exactly transformers'.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

# (assignments_E, probs_E, routed) -> (load fractions f_E of the larger batch, scale of this forward's P_E),
# or None to keep this forward's own semantics (see mixtral_parallel/global_balance.py).
GlobalLoad = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]


def token_weights(attention_mask_BT: torch.Tensor | None, num_tokens: int, device) -> torch.Tensor:
    """(N,) fp32 weight per routed token: 1 for real tokens, 0 for padding (the losses here and the
    router statistics weigh tokens by it)."""
    if attention_mask_BT is None:
        return torch.ones(num_tokens, dtype=torch.float32, device=device)
    return attention_mask_BT.reshape(-1).to(device=device, dtype=torch.float32)


def expert_load_sums(
    router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int, attention_mask_BT=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(assignments_E, probs_E, routed) summed over every layer and real token of this forward:
    (token, k) assignments per expert (no gradient: top-k), router probabilities per expert (with
    gradient), and the number of (layer, real token) rows routed."""
    logits_LNE = torch.stack([logits.float() for logits in router_logits])
    weight_N = token_weights(attention_mask_BT, logits_LNE.shape[1], logits_LNE.device)
    probs_LNE = F.softmax(logits_LNE, dim=-1)
    _, experts_LNK = torch.topk(probs_LNE.detach(), top_k, dim=-1)
    assignments_LNE = F.one_hot(experts_LNK, num_experts).sum(dim=2).float()
    assignments_E = torch.einsum("lne,n->e", assignments_LNE, weight_N)
    probs_E = torch.einsum("lne,n->e", probs_LNE, weight_N)
    return assignments_E, probs_E, weight_N.sum() * logits_LNE.shape[0]


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...],
    num_experts: int,
    top_k: int,
    attention_mask_BT=None,
    global_load: GlobalLoad | None = None,
) -> torch.Tensor:
    """num_experts * sum_e f_e * P_e over all layers' tokens.

    f_e: share of (token, k) assignments that go to expert e (sums to top_k over e);
    P_e: mean router probability of expert e. Each layer contributes N tokens.
    With `global_load`, f_e comes from it (a larger batch's fractions) and P_e is scaled by it.
    """
    assignments_E, probs_E, routed = expert_load_sums(router_logits, num_experts, top_k, attention_mask_BT)
    tokens_per_expert_E, prob_per_expert_E = assignments_E / routed, probs_E / routed
    synced = global_load(assignments_E, probs_E, routed) if global_load is not None else None
    if synced is not None:
        tokens_per_expert_E, scale = synced
        prob_per_expert_E = prob_per_expert_E * scale
    return num_experts * torch.sum(tokens_per_expert_E * prob_per_expert_E)


def router_z_loss(router_logits: tuple[torch.Tensor, ...], attention_mask_BT=None) -> torch.Tensor:
    """Mean over layers and real tokens of logsumexp(router logits)^2 (ST-MoE, eq. 5)."""
    logits_LNE = torch.stack([logits.float() for logits in router_logits])
    weight_N = token_weights(attention_mask_BT, logits_LNE.shape[1], logits_LNE.device)
    z_squared_LN = torch.logsumexp(logits_LNE, dim=-1).pow(2)
    return (z_squared_LN * weight_N).sum() / (weight_N.sum() * logits_LNE.shape[0])
