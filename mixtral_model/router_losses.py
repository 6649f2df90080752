"""Router losses: Switch-Transformer load balancing (as transformers' `load_balancing_loss_func`)
and the ST-MoE router z-loss. Both skip padding tokens when an attention mask is given.
"""

import torch
import torch.nn.functional as F


def token_weights(attention_mask_BT: torch.Tensor | None, num_tokens: int, device) -> torch.Tensor:
    """(N,) fp32 weight per routed token: 1 for real tokens, 0 for padding (the losses here and the
    router statistics weigh tokens by it)."""
    if attention_mask_BT is None:
        return torch.ones(num_tokens, dtype=torch.float32, device=device)
    return attention_mask_BT.reshape(-1).to(device=device, dtype=torch.float32)


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int, attention_mask_BT=None
) -> torch.Tensor:
    """num_experts * sum_e f_e * P_e over all layers' tokens.

    f_e: share of (token, k) assignments that go to expert e (sums to top_k over e);
    P_e: mean router probability of expert e. Each layer contributes N tokens.
    """
    logits_LNE = torch.stack([logits.float() for logits in router_logits])
    weight_N = token_weights(attention_mask_BT, logits_LNE.shape[1], logits_LNE.device)
    probs_LNE = F.softmax(logits_LNE, dim=-1)
    _, experts_LNK = torch.topk(probs_LNE, top_k, dim=-1)
    assignments_LNE = F.one_hot(experts_LNK, num_experts).sum(dim=2).float()
    total_weight = weight_N.sum() * logits_LNE.shape[0]
    tokens_per_expert_E = torch.einsum("lne,n->e", assignments_LNE, weight_N) / total_weight
    prob_per_expert_E = torch.einsum("lne,n->e", probs_LNE, weight_N) / total_weight
    return num_experts * torch.sum(tokens_per_expert_E * prob_per_expert_E)


def router_z_loss(router_logits: tuple[torch.Tensor, ...], attention_mask_BT=None) -> torch.Tensor:
    """Mean over layers and real tokens of logsumexp(router logits)^2 (ST-MoE, eq. 5)."""
    logits_LNE = torch.stack([logits.float() for logits in router_logits])
    weight_N = token_weights(attention_mask_BT, logits_LNE.shape[1], logits_LNE.device)
    z_squared_LN = torch.logsumexp(logits_LNE, dim=-1).pow(2)
    return (z_squared_LN * weight_N).sum() / (weight_N.sum() * logits_LNE.shape[0])
