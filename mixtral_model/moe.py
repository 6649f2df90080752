"""Sparse mixture-of-experts block: route -> dispatch -> experts -> combine.

1. route: fp32 router logits, softmax, top-k experts per token, top-k weights renormalised to 1;
2. dispatch: one stable argsort of the (token, k) assignments by expert, so each expert's tokens
   form one contiguous slice;
3. experts: SwiGLU `w2(silu(w1 x) * w3 x)` on each slice; every expert runs every step, even on
   zero tokens, so all ranks call the same modules (ZeRO-3 gathers stay in lockstep);
4. combine: scale by the routing weight and scatter-add back to token order.

Experts are `nn.Linear` modules named as in the hub checkpoints (`experts.E.w1/w2/w3`), so
bitsandbytes 4-bit layers and PEFT LoRA wrappers drop in unchanged.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .config import MixtralConfig


class Router(nn.Module):
    """Hub name `block_sparse_moe.gate`: a bias-free linear map to one logit per expert, in fp32."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return F.linear(x_ND.float(), self.weight.float())


class Expert(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w2 = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.w3 = nn.Linear(hidden_size, intermediate_size, bias=False)

    def forward(self, x_MD: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x_MD)) * self.w3(x_MD))


def route_top_k(router_logits_NE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token and their softmax weights renormalised to sum 1: (N, K) fp32, (N, K) int64."""
    probs_NE = F.softmax(router_logits_NE.float(), dim=-1)
    weights_NK, experts_NK = torch.topk(probs_NE, top_k, dim=-1)
    return weights_NK / weights_NK.sum(dim=-1, keepdim=True), experts_NK


def sort_assignments_by_expert(experts_NK: torch.Tensor, num_experts: int):
    """Order of the flattened (token, k) slots grouped by expert, and each expert's slot count.

    Returns slot_order_M (M = N*K; stable, so tokens keep their order inside an expert) and
    tokens_per_expert_E (int64).
    """
    flat_experts_M = experts_NK.reshape(-1)
    slot_order_M = torch.argsort(flat_experts_M, stable=True)
    tokens_per_expert_E = torch.bincount(flat_experts_M, minlength=num_experts)
    return slot_order_M, tokens_per_expert_E


def run_experts_on_slices(
    experts: nn.ModuleList, x_sorted_MD: torch.Tensor, counts: list[int]
) -> torch.Tensor:
    """Apply expert e to its contiguous slice of x_sorted_MD (slice sizes = counts, in expert order)."""
    slices = torch.split(x_sorted_MD, counts, dim=0)
    return torch.cat([expert(tokens) for expert, tokens in zip(experts, slices, strict=True)], dim=0)


class SparseMoeBlock(nn.Module):
    def __init__(self, config: MixtralConfig):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.jitter_noise = config.router_jitter_noise
        self.gate = Router(config.hidden_size, self.num_experts)
        self.experts = nn.ModuleList(
            [Expert(config.hidden_size, config.intermediate_size) for _ in range(self.num_experts)]
        )

    def apply_jitter(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """Multiplicative noise U(1 - eps, 1 + eps) on the block input, only while training."""
        if not (self.training and self.jitter_noise > 0):
            return x_BTD
        noise = torch.empty_like(x_BTD).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        return x_BTD * noise

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the block output (B, T, D) and the router logits (B*T, E) in fp32."""
        b, t, d = x_BTD.shape
        x_ND = self.apply_jitter(x_BTD).reshape(-1, d)
        router_logits_NE = self.gate(x_ND)
        weights_NK, experts_NK = route_top_k(router_logits_NE, self.top_k)
        slot_order_M, tokens_per_expert_E = sort_assignments_by_expert(experts_NK, self.num_experts)
        token_of_slot_M = slot_order_M // self.top_k
        y_sorted_MD = run_experts_on_slices(self.experts, x_ND[token_of_slot_M], tokens_per_expert_E.tolist())
        weighted_MD = y_sorted_MD * weights_NK.reshape(-1)[slot_order_M, None]
        out_ND = torch.zeros_like(x_ND).index_add_(0, token_of_slot_M, weighted_MD.to(x_ND.dtype))
        return out_ND.view(b, t, d), router_logits_NE
