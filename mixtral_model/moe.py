"""Sparse mixture-of-experts block: route -> dispatch -> experts -> combine.

1. route: fp32 router logits, softmax, top-k experts per token, top-k weights renormalised to 1;
2. capacity (only with `expert_capacity_factor`; None = dropless): each expert keeps at most
   C = ceil(factor * N * top_k / E) of the N tokens' (token, k) slots, earliest tokens first (the
   token-position priority of Switch Transformer; a token's k-th choice is not ranked behind other
   tokens' first choices as in GShard); a dropped slot contributes 0 to its token, whose residual
   connection carries it on. N counts every token of this rank's batch, padding too;
3. dispatch: one stable argsort of the kept slots by expert and one `index_select` of their token
   rows, so each expert's rows form one contiguous slice. Under expert parallelism the block's token
   dispatcher (installed by `parallel.parallelize_experts`) carries the sorted rows to the ranks that
   own their experts and back after step 4;
4. experts: SwiGLU `w2(silu(w1 x) * w3 x)` on each slice. Two backends (`expert_backend`, or
   "auto": `choose_expert_backend`, which follows measurements): `per_expert`, the reference (one
   module call per expert: works with any layer, hook or adapter), and `grouped_loop`, which reads the
   weights of every local expert without module calls (`grouped_experts.py`: the whole SwiGLU with its
   adapters as one autograd node, expert by expert, bitwise per_expert's numbers). It takes plain
   `nn.Linear`, bitsandbytes 4-bit and single-adapter PEFT LoRA experts, and ZeRO-3
   experts while their block (a ZeRO-3 leaf) holds them gathered; any other case (merged/disabled/
   several adapters, DoRA, hooks on the expert layers, a partitioned weight outside the block's
   forward) runs `per_expert`. Every local expert
   runs every step, even on zero rows, so all ranks call the same modules (ZeRO-3 gathers and EP
   collectives stay in lockstep);
5. combine: scale each row by its routing weight and index-add it back to its token.

Experts live in an `nn.ModuleDict` keyed by their global index, so the state-dict keys are the hub
keys (`experts.E.w1.weight`) whether the block holds all experts (as built) or, once
`parallel.parallelize_experts` has run, this rank's slice.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mixtral_compat.torch import has_global_forward_hooks, has_hooks

from .config import MixtralConfig
from .grouped_experts import GROUPED_KERNELS, gathered, grouped_swiglu, read_projection

EXPERT_BACKENDS = ("auto", "per_expert", *GROUPED_KERNELS)


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


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots one expert may take: ceil(capacity_factor * num_tokens * top_k / num_experts)."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


@dataclass
class SlotPlan:
    """Which (token, k) slots go where: slot s = token * top_k + k.

    slot_order_M: the kept slots grouped by expert (token order inside an expert), M <= N * K;
    tokens_per_expert_E: kept slots per expert (int64), summing to M.
    """

    slot_order_M: torch.Tensor
    tokens_per_expert_E: torch.Tensor


def plan_slots(experts_NK: torch.Tensor, num_experts: int, capacity: int | None = None) -> SlotPlan:
    """Sort the slots by expert (stable) and, with a capacity, drop each expert's slots beyond it."""
    flat_experts_S = experts_NK.reshape(-1)
    slot_order_S = torch.argsort(flat_experts_S, stable=True)
    tokens_per_expert_E = torch.bincount(flat_experts_S, minlength=num_experts)
    if capacity is None:
        return SlotPlan(slot_order_S, tokens_per_expert_E)
    first_position_E = torch.cumsum(tokens_per_expert_E, 0) - tokens_per_expert_E
    position_in_expert_S = torch.arange(slot_order_S.numel(), device=slot_order_S.device)
    position_in_expert_S = position_in_expert_S - first_position_E[flat_experts_S[slot_order_S]]
    kept_S = position_in_expert_S < capacity
    return SlotPlan(slot_order_S[kept_S], tokens_per_expert_E.clamp(max=capacity))


def choose_expert_backend(*, readable: bool, partitioned: bool, device_type: str) -> str:
    """The backend for these facts, by measurement (bench/results/cpu_2026-11-27_loop.md and the H200
    run of bench/gpu_check.py, docs/reference.md "Measured numbers"):

    * CPU: `grouped_loop`, the expert loop: per_expert's numbers bit for bit, less kept for backward,
      per_expert's speed within noise (both are GEMM-bound there). On CPUs without native bf16 it runs
      the per-projection path, whose backward multiplies by a transposed weight copy.
    * CUDA: `per_expert`; bench/gpu_check.py times the expert loop against it on a GPU. (A
      `torch._grouped_mm` backend was slower than per_expert on an H200 and was removed.)

    `grouped_loop` stays available through `SparseMoeBlock.expert_backend` and is held to
    `per_expert` in tests.

    readable: every w1/w2/w3 is a bias-free `nn.Linear` or bitsandbytes `Linear4bit`, or a PEFT LoRA
    layer over one with a single active, unmerged, vanilla adapter, and nothing hooks them;
    partitioned: some expert weight is a ZeRO-3 partition not gathered at this moment.
    """
    if not readable or partitioned:
        return "per_expert"
    if device_type == "cpu":
        return "grouped_loop"
    return "per_expert"


def expert_layers(experts: Sequence[Expert]) -> list[nn.Module]:
    return [layer for expert in experts for layer in (expert.w1, expert.w2, expert.w3)]


def read_experts(experts: Sequence[Expert]):
    """Grouped views of (w1, w3, w2) over these experts, or None when some projection is not readable."""
    if any(has_hooks(expert, backward=False) for expert in experts):
        return None
    views = tuple(
        read_projection([getattr(expert, name) for expert in experts]) for name in ("w1", "w3", "w2")
    )
    return None if any(v is None for v in views) else views


def expert_backend_for(experts: Sequence[Expert], views=None) -> str:
    """`choose_expert_backend` on the facts of these expert modules (views: `read_experts(experts)`)."""
    views = read_experts(experts) if views is None else views
    weight = expert_layers(experts)[0].weight
    return choose_expert_backend(
        readable=views is not None and not has_global_forward_hooks(),
        partitioned=any(not gathered(p) for p in (p for e in experts for p in e.parameters())),
        device_type=weight.device.type,
    )


def per_expert_forward(
    experts: Sequence[Expert], x_sorted_MD: torch.Tensor, counts: list[int]
) -> torch.Tensor:
    """Apply expert e to its contiguous slice of x_sorted_MD (slice sizes = counts, in expert order)."""
    slices = torch.split(x_sorted_MD, counts, dim=0)
    return torch.cat([expert(rows) for expert, rows in zip(experts, slices, strict=True)], dim=0)


def combine(
    y_sorted_MD: torch.Tensor, weights_NK: torch.Tensor, slot_order_M: torch.Tensor, x_ND: torch.Tensor
):
    """out_ND[token] = sum over the token's kept slots of routing weight * expert output."""
    top_k = weights_NK.shape[1]
    weighted_MD = y_sorted_MD * weights_NK.reshape(-1).index_select(0, slot_order_M)[:, None]
    out_ND = torch.zeros_like(x_ND)
    return out_ND.index_add_(0, slot_order_M // top_k, weighted_MD.to(x_ND.dtype))


class SparseMoeBlock(nn.Module):
    """Hub name `block_sparse_moe`, built with every expert. `parallel.parallelize_experts` makes it
    expert-parallel from outside: it keeps this rank's experts and sets `token_dispatcher`.

    Attributes: `num_experts` (global E), `top_k`, `capacity_factor`, `local_expert_ids` (the global
    indices this block holds, also the `experts` keys), `token_dispatcher` (None: every expert is here;
    else `dispatcher(run_local_experts, rows sorted by expert, tokens_per_expert_E)` returns the expert
    outputs of those rows, computed wherever their experts live) and `expert_backend` ("auto" or one of
    the backends: overrides the automatic choice).
    """

    def __init__(self, config: MixtralConfig):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.jitter_noise = config.router_jitter_noise
        self.capacity_factor = config.expert_capacity_factor
        self.expert_backend = "auto"
        self.token_dispatcher = None
        self.gate = Router(config.hidden_size, self.num_experts)
        self.experts = nn.ModuleDict(
            {str(e): Expert(config.hidden_size, config.intermediate_size) for e in range(self.num_experts)}
        )

    @property
    def local_expert_ids(self) -> list[int]:
        return [int(e) for e in self.experts]

    def apply_jitter(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """Multiplicative noise U(1 - eps, 1 + eps) on the block input, only while training."""
        if not (self.training and self.jitter_noise > 0):
            return x_BTD
        noise = torch.empty_like(x_BTD).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        return x_BTD * noise

    def capacity(self, num_tokens: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return expert_capacity(num_tokens, self.top_k, self.num_experts, self.capacity_factor)

    def run_local_experts(self, x_sorted_MD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """This rank's experts on their contiguous slices (counts: rows per local expert, in order)."""
        experts = list(self.experts.values())
        backend = self.expert_backend
        if backend not in EXPERT_BACKENDS:
            raise ValueError(f"expert_backend={backend!r} is not one of {EXPERT_BACKENDS}")
        if backend == "per_expert":
            return per_expert_forward(experts, x_sorted_MD, counts)
        views = read_experts(experts)
        if backend == "auto":
            backend = expert_backend_for(experts, views)
            if backend == "per_expert":
                return per_expert_forward(experts, x_sorted_MD, counts)
        elif views is None or any(not gathered(p) for p in self.experts.parameters()):
            raise ValueError(
                f"expert_backend={backend!r} cannot read these experts (merged, disabled or several "
                "LoRA adapters, a LoRA variant, hooks, or ZeRO-3 partitions outside the block): use 'auto' or 'per_expert'"
            )
        return grouped_swiglu(*views, x_sorted_MD, counts)

    def run_experts(self, x_sorted_MD: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """Rows sorted by global expert -> expert outputs in the same order, here or through the dispatcher."""
        if self.token_dispatcher is None:
            return self.run_local_experts(x_sorted_MD, tokens_per_expert_E.tolist())
        return self.token_dispatcher(self.run_local_experts, x_sorted_MD, tokens_per_expert_E)

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the block output (B, T, D) and the router logits (B*T, E) in fp32."""
        b, t, d = x_BTD.shape
        x_ND = self.apply_jitter(x_BTD).reshape(-1, d)
        router_logits_NE = self.gate(x_ND)
        weights_NK, experts_NK = route_top_k(router_logits_NE, self.top_k)
        plan = plan_slots(experts_NK, self.num_experts, self.capacity(x_ND.shape[0]))
        x_sorted_MD = x_ND.index_select(0, plan.slot_order_M // self.top_k)
        y_sorted_MD = self.run_experts(x_sorted_MD, plan.tokens_per_expert_E)
        out_ND = combine(y_sorted_MD, weights_NK, plan.slot_order_M, x_ND)
        return out_ND.view(b, t, d), router_logits_NE
