"""Expert parallelism (EP), applied from outside the model: which experts a rank keeps, its process
groups, and the all-to-all that carries token rows to their experts' ranks and back.

The model is built and correct on one device with every expert. One step makes it expert-parallel:

    groups = new_expert_parallel_groups(n)   # collective: every rank, same order
    parallelize_experts(model, groups)       # each MoE block keeps its E/n experts, dispatches by all-to-all

The groups are one value, created once: the caller hands them to what needs the layout
(`prepare_for_deepspeed`, the trainers' `expert_parallel=`, the adapter save/load of expert_state.py),
each of which checks them against the model once (`check_expert_parallel_layout`). The model itself
records them in one attribute, `model.expert_parallel` (None: not expert-parallel), which its own
`save_pretrained` reads.

(`MixtralForCausalLM.from_pretrained(path, expert_parallel_size=n)` does both, before the weights are
read, so a rank reads only its own experts' tensors: checkpoint.py.)

Layout (DeepSpeed's and Megatron's), for world size W, EP size n and E experts:
- EP group: n consecutive ranks {g*n, ..., g*n + n - 1}. EP rank p = rank % n keeps experts
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
wiring (zero.py) sums expert grads over the EDP group and divides by W, just as it sums dense grads
over all W ranks and divides by W; both are then the grad of the mean loss over all ranks.
"""

import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mixtral_model.moe import SparseMoeBlock

EXPERT_PARAM_PATTERN = re.compile(r"(^|\.)block_sparse_moe\.experts\.\d+\.")


def is_expert_param(name: str) -> bool:
    """True for a parameter inside an expert (base weights and PEFT adapters alike): sharded over the EP
    group, reduced over the expert-data-parallel group. Accepts wrapped names (`module.`, `base_model.`)."""
    return EXPERT_PARAM_PATTERN.search(name) is not None


def validate_expert_parallel(size, num_experts: int | None = None, world_size: int | None = None) -> None:
    """The one check of an EP layout: a one-line ValueError when `size` ranks cannot share out
    `num_experts` experts, or cannot tile `world_size` ranks (None: not known yet, not checked)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"expert_parallel_size={size!r} must be a positive integer")
    if num_experts is not None and num_experts % size:
        raise ValueError(
            f"expert_parallel_size={size} does not divide num_local_experts={num_experts}: choose a divisor of {num_experts}"
        )
    if world_size is None:
        return
    if size > world_size:
        raise ValueError(
            f"expert_parallel_size={size} exceeds the world size {world_size}: launch at least {size} ranks or lower it"
        )
    if world_size % size:
        raise ValueError(
            f"expert_parallel_size={size} does not divide the world size {world_size}: launch a multiple of {size} ranks"
        )


def expert_parallel_ranks(rank: int, world_size: int, size: int) -> tuple[list[int], list[int]]:
    """(EP group ranks, expert-data-parallel group ranks) of `rank`."""
    first = rank - rank % size
    return list(range(first, first + size)), list(range(rank % size, world_size, size))


@dataclass(frozen=True)
class ExpertParallelGroups:
    """This rank's place in the EP layout: EP size n, EP rank p, and the two process groups."""

    size: int
    rank: int
    expert_parallel: dist.ProcessGroup  # the n ranks that share out the experts and exchange tokens
    expert_data_parallel: dist.ProcessGroup  # the ranks holding the same experts: expert grads reduce here

    def local_experts(self, num_experts: int) -> list[int]:
        per_rank = num_experts // self.size
        return list(range(self.rank * per_rank, (self.rank + 1) * per_rank))

    def __deepcopy__(self, memo):  # a copied model (e.g. a frozen reference) routes over the same groups
        return self


def new_expert_parallel_groups(size: int) -> ExpertParallelGroups:
    """Check the layout against the world and create this rank's EP and EDP groups of EP size `size`.
    Collective: every rank calls it, in the same order. The caller keeps the result."""
    validate_expert_parallel(size)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"expert_parallel_size={size} needs an initialised torch.distributed process group: launch with "
            "torchrun and call torch.distributed.init_process_group() first"
        )
    rank, world_size = dist.get_rank(), dist.get_world_size()
    validate_expert_parallel(size, world_size=world_size)
    my_ep_ranks, my_edp_ranks = expert_parallel_ranks(rank, world_size, size)
    ep_group = edp_group = None
    for first in range(0, world_size, size):
        group = dist.new_group(list(range(first, first + size)))
        ep_group = group if first == my_ep_ranks[0] else ep_group
    for p in range(size):
        group = dist.new_group(list(range(p, world_size, size)))
        edp_group = group if p == my_edp_ranks[0] else edp_group
    return ExpertParallelGroups(size, rank % size, ep_group, edp_group)


class AllToAllDispatch:
    """A MoE block's token dispatcher under EP: `exchange_with_expert_owners` over the EP group."""

    def __init__(self, groups: ExpertParallelGroups):
        self.groups = groups

    def __call__(self, expert_fn, x_sorted_MD: torch.Tensor, tokens_per_expert_E: torch.Tensor):
        return exchange_with_expert_owners(
            expert_fn, x_sorted_MD, tokens_per_expert_E, self.groups.expert_parallel
        )

    def __deepcopy__(self, memo):
        return self


def moe_blocks(model: nn.Module) -> list[SparseMoeBlock]:
    return [m for m in model.modules() if isinstance(m, SparseMoeBlock)]


def parallelize_experts(model: nn.Module, groups: ExpertParallelGroups) -> nn.Module:
    """Make `model` expert-parallel in place: each MoE block keeps this rank's experts (the others are
    deleted: build on the meta device to never materialise them) and exchanges token rows with the EP
    group by all-to-all; `model.expert_parallel` holds `groups`. Call once, before PEFT wrapping and
    before DeepSpeed (zero.py)."""
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError("parallelize_experts: the model has no SparseMoeBlock")
    if any(block.token_dispatcher is not None for block in blocks):
        raise ValueError("parallelize_experts: the model is already expert-parallel")
    for block in blocks:
        validate_expert_parallel(groups.size, num_experts=block.num_experts)
        keep = {str(e) for e in groups.local_experts(block.num_experts)}
        for name in [name for name in block.experts if name not in keep]:
            del block.experts[name]
        block.token_dispatcher = AllToAllDispatch(groups)
    model.expert_parallel = groups
    return model


def check_expert_parallel_layout(model: nn.Module, groups: ExpertParallelGroups | None) -> None:
    """A layout handed to a function agrees with the model's MoE blocks: each dispatches over `groups`
    and holds `groups`' experts (groups None: none is expert-parallel). One-line ValueError if not."""
    for block in moe_blocks(model):
        dispatcher = block.token_dispatcher
        held = (
            "every expert"
            if dispatcher is None
            else f"EP rank {dispatcher.groups.rank} of {dispatcher.groups.size}"
        )
        if groups is None:
            if dispatcher is not None:
                raise ValueError(
                    f"the model is expert-parallel ({held}) but no expert-parallel layout was passed: "
                    "pass the groups parallelize_experts was given"
                )
        elif (
            dispatcher is None
            or dispatcher.groups is not groups
            or block.local_expert_ids != groups.local_experts(block.num_experts)
        ):
            raise ValueError(
                f"the expert-parallel layout passed (EP rank {groups.rank} of {groups.size}) is not the model's "
                f"({held}): pass the groups parallelize_experts was given"
            )


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
