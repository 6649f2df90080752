"""Expert parallelism (EP): which experts a rank holds, its process groups, and the all-to-all that
carries token rows to their experts' ranks and back.

Layout (DeepSpeed's and Megatron's), for world size W, expert_parallel_size n and E experts:
- EP group: n consecutive ranks {g*n, ..., g*n + n - 1}. EP rank p = rank % n builds experts
  [p*E/n, (p+1)*E/n), named by their global index, so hub checkpoint keys stay valid;
- expert-data-parallel (EDP) group: the W/n ranks holding the same experts, {p, p + n, p + 2n, ...}.

Token exchange (`exchange_with_expert_owners`), for rows already sorted by global expert:
1. counts: an all-to-all of the per-expert row counts tells every rank how many rows each source
   rank sends to each of its experts;
2. dispatch: an all-to-all with uneven splits; the received rows are ordered (source rank, local
   expert) and are regrouped to (local expert, source rank), one contiguous slice per expert;
3. experts: the caller's function runs the local experts on their slices;
4. return: the inverse regroup and the reverse all-to-all put every row back on its sender, in the
   sender's order.
Both all-to-alls are differentiable (`all_to_all`): the backward of one is the other with its splits
swapped. Every rank of an EP group must run the same number of MoE forwards (and backwards): with
`generate`, pass `synced_gpus=True` so a rank that finished keeps stepping until all have.

Gradients after backward: a dense parameter's grad on rank r is the grad of rank r's loss; an expert
parameter's grad on its owner is the grad of the SUM of its EP group's losses. So the optimizer
wiring sums expert grads over the EDP group and divides by W, just as it sums dense grads over all W
ranks and divides by W; both are then the grad of the mean loss over all ranks.

API: `validate_expert_parallel` (call before building anything), `init_expert_parallel_groups`
(collective; building the model calls it), `get_expert_parallel_group`,
`get_expert_data_parallel_group`, `expert_parallel_ranks`, `is_expert_param`.
"""

import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

EXPERT_PARAM_PATTERN = re.compile(r"(^|\.)block_sparse_moe\.experts\.\d+\.")


def is_expert_param(name: str) -> bool:
    """True for a parameter inside an expert (base weights and PEFT adapters alike): sharded over the EP
    group, reduced over the expert-data-parallel group. Accepts wrapped names (`module.`, `base_model.`)."""
    return EXPERT_PARAM_PATTERN.search(name) is not None


def validate_expert_parallel(config, world_size: int | None) -> None:
    """One-line ValueError when config.expert_parallel_size cannot split config.num_local_experts over
    world_size ranks (world_size None: check only what the config alone decides)."""
    n, num_experts = config.expert_parallel_size, config.num_local_experts
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"expert_parallel_size={n!r} must be a positive integer")
    if num_experts % n:
        raise ValueError(
            f"expert_parallel_size={n} does not divide num_local_experts={num_experts}: choose a divisor of {num_experts}"
        )
    if world_size is None:
        return
    if n > world_size:
        raise ValueError(
            f"expert_parallel_size={n} exceeds the world size {world_size}: launch at least {n} ranks or lower it"
        )
    if world_size % n:
        raise ValueError(
            f"world size {world_size} is not a multiple of expert_parallel_size={n}: launch a multiple of {n} ranks"
        )


def expert_parallel_ranks(rank: int, world_size: int, size: int) -> tuple[list[int], list[int]]:
    """(EP group ranks, expert-data-parallel group ranks) of `rank`."""
    first = rank - rank % size
    return list(range(first, first + size)), list(range(rank % size, world_size, size))


@dataclass(frozen=True)
class ExpertParallelPlacement:
    """Where this rank sits: EP size n and EP rank p (p holds experts [p*E/n, (p+1)*E/n))."""

    size: int
    rank: int

    def local_experts(self, num_experts: int) -> list[int]:
        per_rank = num_experts // self.size
        return list(range(self.rank * per_rank, (self.rank + 1) * per_rank))


def expert_parallel_placement(config) -> ExpertParallelPlacement:
    """This rank's placement for config.expert_parallel_size; with n > 1 it checks the world and creates
    the groups (collective: every rank builds the model, in the same order)."""
    n = config.expert_parallel_size
    validate_expert_parallel(config, world_size=None)
    if n == 1:
        return ExpertParallelPlacement(1, 0)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"expert_parallel_size={n} needs an initialised torch.distributed process group: launch with "
            "torchrun and call torch.distributed.init_process_group() before building the model"
        )
    validate_expert_parallel(config, dist.get_world_size())
    init_expert_parallel_groups(n)
    return ExpertParallelPlacement(n, dist.get_rank() % n)


@dataclass(frozen=True)
class ExpertParallelGroups:
    expert_parallel: dist.ProcessGroup
    expert_data_parallel: dist.ProcessGroup
    world: dist.ProcessGroup  # the default group these were made under (a new one invalidates them)


_GROUPS: dict[int, ExpertParallelGroups] = {}


def init_expert_parallel_groups(size: int) -> ExpertParallelGroups:
    """Create this rank's EP and expert-data-parallel groups of EP size `size`, or return them if they
    exist. Collective on first call: every rank must call it, in the same order."""
    cached = _GROUPS.get(size)
    if cached is not None and cached.world is dist.group.WORLD:
        return cached
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if world_size % size:
        raise ValueError(
            f"world size {world_size} is not a multiple of expert_parallel_size={size}: launch a multiple of {size} ranks"
        )
    my_ep_ranks, my_edp_ranks = expert_parallel_ranks(rank, world_size, size)
    ep_group = edp_group = None
    for first in range(0, world_size, size):
        group = dist.new_group(list(range(first, first + size)))
        ep_group = group if first == my_ep_ranks[0] else ep_group
    for p in range(size):
        group = dist.new_group(list(range(p, world_size, size)))
        edp_group = group if p == my_edp_ranks[0] else edp_group
    _GROUPS[size] = ExpertParallelGroups(ep_group, edp_group, dist.group.WORLD)
    return _GROUPS[size]


def _groups(size: int) -> ExpertParallelGroups:
    groups = _GROUPS.get(size)
    if groups is None or groups.world is not dist.group.WORLD:
        raise RuntimeError(
            f"no expert-parallel groups of size {size}: call init_expert_parallel_groups({size}) on every rank "
            "first (building a model with that expert_parallel_size does it)"
        )
    return groups


def get_expert_parallel_group(size: int) -> dist.ProcessGroup:
    """The `size` consecutive ranks that share out the experts and exchange tokens (all-to-all)."""
    return _groups(size).expert_parallel


def get_expert_data_parallel_group(size: int) -> dist.ProcessGroup:
    """The ranks holding the same experts as this one (rank % size equal): reduce expert grads here."""
    return _groups(size).expert_data_parallel


def _all_to_all_single(x_MD: torch.Tensor, output_splits: list[int], input_splits: list[int], group):
    out_MD = x_MD.new_empty((sum(output_splits), *x_MD.shape[1:]))
    dist.all_to_all_single(out_MD, x_MD.contiguous(), output_splits, input_splits, group=group)
    return out_MD


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_MD, output_splits, input_splits, group):
        ctx.splits, ctx.group = (output_splits, input_splits), group
        return _all_to_all_single(x_MD, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad_MD):
        output_splits, input_splits = ctx.splits
        return _all_to_all_single(grad_MD, input_splits, output_splits, ctx.group), None, None, None


def all_to_all(x_MD: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """Differentiable `all_to_all_single` along dim 0: rows input_splits[q] go to rank q of `group`,
    rows output_splits[s] arrive from rank s. Backward sends the gradients back the same way."""
    return _AllToAll.apply(x_MD, output_splits, input_splits, group)


def regroup_chunks(x_MD: torch.Tensor, counts_AB: list[list[int]]) -> torch.Tensor:
    """Rows laid out as chunks in (a, b) order, chunk (a, b) of counts_AB[a][b] rows -> (b, a) order."""
    num_a, num_b = len(counts_AB), len(counts_AB[0])
    chunks = torch.split(x_MD, [c for row in counts_AB for c in row])
    return torch.cat([chunks[a * num_b + b] for b in range(num_b) for a in range(num_a)])


def exchange_with_expert_owners(
    expert_fn, x_sorted_MD: torch.Tensor, tokens_per_expert_E: torch.Tensor, group
):
    """Run the experts of the EP `group` on rows sorted by global expert; returns their outputs in the
    same order. expert_fn(rows, counts) runs this rank's experts on contiguous slices of `counts` rows.
    """
    n = dist.get_world_size(group)
    recv_counts_E = torch.empty_like(tokens_per_expert_E)
    dist.all_to_all_single(recv_counts_E, tokens_per_expert_E.contiguous(), group=group)
    send_counts_PL = tokens_per_expert_E.view(n, -1).tolist()  # rows for expert l of rank p
    recv_counts_SL = recv_counts_E.view(n, -1).tolist()  # rows from rank s for local expert l
    send_splits = [sum(row) for row in send_counts_PL]
    recv_splits = [sum(row) for row in recv_counts_SL]

    x_recv_MD = all_to_all(x_sorted_MD, recv_splits, send_splits, group)
    x_local_MD = regroup_chunks(x_recv_MD, recv_counts_SL)
    rows_per_local_expert = [sum(column) for column in zip(*recv_counts_SL, strict=True)]
    y_local_MD = expert_fn(x_local_MD, rows_per_local_expert)
    recv_counts_LS = [list(column) for column in zip(*recv_counts_SL, strict=True)]
    y_recv_MD = regroup_chunks(y_local_MD, recv_counts_LS)
    return all_to_all(y_recv_MD, send_splits, recv_splits, group)
