"""DeepSpeed wiring for the sparse-MoE model: which ZeRO x expert-parallel combinations we support,
and the one call that prepares a model for `deepspeed.initialize` (directly or through HF Trainer).

Gradient rule: a dense parameter's gradient is averaged over the whole data-parallel (DP) group; an
expert's gradient is summed over its expert-data-parallel (EDP) group -- the ranks holding the same
experts -- and divided by the global DP size. How DeepSpeed is made to apply it:

* expert_parallel_size == 1: every rank holds every expert, the EDP group is the DP group, and the
  rule is DeepSpeed's plain average. Nothing MoE-specific is handed to DeepSpeed.
* ZeRO 0/1/2, expert_parallel_size > 1: DeepSpeed's own MoE conventions. Expert parameters are MoE
  parameters (`allreduce=False`, `group_name="ep_size_N"`), the optimizer groups are split with
  `split_params_into_different_moe_groups_for_optimizer`, and the `ep_size_N` groups in
  `deepspeed.utils.groups` are the groups the model routes over. DeepSpeed divides every bucket by the
  DP size and reduces an MoE group's bucket over its EDP group: exactly the rule. The engine turns that
  path on only when it finds a `deepspeed.moe.layer.MoE` module, so a parameter-free
  marker (`mixtral_compat.deepspeed.moe_marker`) is attached to the model.
* ZeRO-3, expert_parallel_size > 1: DeepSpeed 0.19's AutoEP placement attributes on each expert
  parameter (`ds_zero_placement_family="autoep_expert"`, `ds_zero_partition_group_name`,
  `ds_zero_partition_process_group` = the EDP group). ZeRO-3's parameter conversion partitions an
  expert over that group only (so its gathers and reduce-scatters stay there), and the optimizer
  divides gradients of "autoep_expert" sub-groups by the DP size. No marker here: the engine's
  stage-3 MoE check accepts only AutoEP layers, and the attributes alone do the work.
* Any stage, expert_parallel_size > 1: the `allreduce=False` mark also makes the engine's start-up
  broadcast send each expert from its EDP group's first rank rather than overwrite it with rank 0's.

ZeRO-3 and routing: each `SparseMoeBlock` is a ZeRO-3 leaf module (`deepspeed.utils.set_z3_leaf_modules`),
so all of a block's parameters are gathered once on entry, whatever experts this rank's tokens pick;
ranks that route differently still issue identical collectives (DeepSpeed issue 4808). moe.py runs
every local expert even on zero rows, which alone keeps per-module gathers in step; the leaf marking
keeps them in step for any expert loop that skips idle experts (without it, such a loop on ranks that
route differently is a collective mismatch: an error on gloo, a hang on NCCL; see
tests/test_deepspeed.py). Cost: one hook and one gather per block instead of per expert linear, but a
block's experts are all resident at once (Mixtral-8x7B: 1.4e9 parameters per layer).

Use (see `prepare_for_deepspeed`): check the combination before building the model, prepare the model
before `deepspeed.initialize` / `Trainer(...)`, and pass the returned parameter groups (or use
`mixtral_tune.training.trainers.DeepSpeedMoETrainerMixin` with HF Trainer).
"""

import inspect
from dataclasses import dataclass

import torch
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
from deepspeed.runtime.zero import GatheredParameters
from deepspeed.utils import set_z3_leaf_modules
from torch import distributed as dist
from torch import nn

from mixtral_compat.deepspeed import (
    adopt_expert_groups,
    expert_groups,
    is_zero3_partitioned,
    mark_zero3_expert_placement,
    moe_marker,
    moe_marker_class,
)
from mixtral_model.moe import SparseMoeBlock
from mixtral_parallel.expert_parallel import (
    ExpertParallelGroups,
    check_expert_parallel_layout,
    expert_parallel_ranks,
    is_expert_param,
    validate_expert_parallel,
)


@dataclass(frozen=True)
class Combination:
    zero_stage: int
    expert_parallel: bool
    peft: bool
    supported: bool
    how: str


TESTS = "tests/test_deepspeed.py"
STAGE0_EP = (
    "DeepSpeed's non-ZeRO path clips with a wrong expert gradient norm under EP; use ZeRO stage 1 or 2"
)
COMBINATIONS = (
    Combination(0, False, False, True, f"{TESTS}: 3 SGD steps == single-process reference (slow)"),
    Combination(1, False, False, True, f"{TESTS}: 3 SGD steps == reference (slow)"),
    Combination(2, False, False, True, f"{TESTS}: 3 SGD steps == reference"),
    Combination(
        3, False, False, True, f"{TESTS}: 3 SGD steps == reference, skewed routing, idle experts skipped"
    ),
    Combination(0, False, True, True, "only adapters train, on DeepSpeed's plain data-parallel path"),
    Combination(1, False, True, True, "only adapters train, on DeepSpeed's plain data-parallel path"),
    Combination(2, False, True, True, "only adapters train, on DeepSpeed's plain data-parallel path"),
    Combination(
        3, False, True, True, f"{TESTS}: LoRA (attention + experts), 3 SGD steps == reference (slow)"
    ),
    Combination(0, True, False, False, STAGE0_EP),
    Combination(1, True, False, True, f"{TESTS}: EP=2, 3 SGD steps == reference (slow)"),
    Combination(
        2, True, False, True, f"{TESTS}: EP=2 on 2 ranks, HF Trainer; EP=2 x EDP=2 on 4 ranks (slow)"
    ),
    Combination(
        3, True, False, True, f"{TESTS}: EP=2 on 2 ranks, skewed routing; 4 ranks, HF Trainer (slow)"
    ),
    Combination(0, True, True, False, STAGE0_EP),
    Combination(
        1, True, True, True, "ZeRO-2's DeepSpeed code (stage_1_and_2.py); ZeRO-1 + EP tested without PEFT"
    ),
    Combination(
        2,
        True,
        True,
        True,
        f"{TESTS}: EP=2, LoRA on attention + experts, 3 SGD steps == EP=1 reference, one complete adapter "
        "saved (slow); tests/test_pipelines.py: SFT LoRA (slow)",
    ),
    Combination(
        3,
        True,
        True,
        True,
        f"{TESTS}: EP=2, LoRA on attention + experts, skewed routing, 3 SGD steps == EP=1 reference, one "
        "complete adapter saved; tests/test_pipelines.py: SFT LoRA, SFT/DPO QLoRA and DPO LoRA (slow)",
    ),
)


def supported_combinations() -> list[Combination]:
    """Every ZeRO stage x expert parallelism x PEFT combination, supported or not, and how it is proven."""
    return list(COMBINATIONS)


def check_parallel_combination(zero_stage: int, expert_parallel_size: int, peft: bool = False) -> None:
    """Raise a one-line ValueError for a combination we do not support; call before building the model."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage={zero_stage} is not a ZeRO stage; use 0, 1, 2 or 3")
    validate_expert_parallel(expert_parallel_size)
    row = next(
        c
        for c in COMBINATIONS
        if (c.zero_stage, c.expert_parallel, c.peft) == (zero_stage, expert_parallel_size > 1, bool(peft))
    )
    if not row.supported:
        raise ValueError(
            f"ZeRO stage {zero_stage} with expert_parallel_size={expert_parallel_size}"
            f"{' and PEFT' if peft else ''} is not supported: {row.how}"
        )


def zero_stage_of(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def expert_group_name(expert_parallel_size: int) -> str:
    """DeepSpeed's name for the expert-parallel / expert-data-parallel group pair of this size."""
    return f"ep_size_{expert_parallel_size}"


def our_expert_group_ranks(expert_parallel_size: int) -> tuple[list[int], list[int]]:
    """This rank's (EP ranks, EDP ranks) as parallel.py lays them out (DeepSpeed's layout too)."""
    return expert_parallel_ranks(dist.get_rank(), dist.get_world_size(), expert_parallel_size)


def register_expert_groups_with_deepspeed(ep: ExpertParallelGroups) -> None:
    """Make DeepSpeed's `ep_size_N` groups the EP and EDP groups the model routes over (parallel.py).

    Ours are adopted under the name DeepSpeed's MoE code looks up (`mixtral_compat.deepspeed`; a name
    already there keeps its groups, which must span the same ranks: checked).
    """
    ep_ranks, edp_ranks = our_expert_group_ranks(ep.size)
    adopt_expert_groups(
        expert_group_name(ep.size), ep.expert_parallel, ep_ranks, ep.expert_data_parallel, edp_ranks
    )
    check_deepspeed_expert_groups(ep.size)


def check_deepspeed_expert_groups(expert_parallel_size: int) -> None:
    """DeepSpeed's `ep_size_N` groups must exist and span this rank's EP and EDP ranks."""
    name = expert_group_name(expert_parallel_size)
    found = expert_groups(name)
    if found is None:
        raise RuntimeError(
            f"DeepSpeed has no {name} groups; call prepare_for_deepspeed before deepspeed.initialize"
        )
    actual = tuple(dist.get_process_group_ranks(group) for group in found)
    expected = our_expert_group_ranks(expert_parallel_size)
    if tuple(actual) != tuple(expected):
        raise RuntimeError(
            f"DeepSpeed's {name} groups span (EP, EDP) ranks {actual}, the model's span {expected}"
        )


def named_expert_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every parameter inside an expert (base weights and any PEFT adapters), with its full name."""
    return [(name, param) for name, param in model.named_parameters() if is_expert_param(name)]


def mark_expert_parameters(model: nn.Module, expert_parallel_size: int, zero_stage: int) -> int:
    """Tag expert parameters as DeepSpeed MoE parameters of the `ep_size_N` groups; returns how many."""
    name = expert_group_name(expert_parallel_size)
    expert_params = named_expert_parameters(model)
    for param_name, param in expert_params:
        if zero_stage == 3 and is_zero3_partitioned(param):
            raise ValueError(
                f"{param_name} was partitioned by deepspeed.zero.Init before expert parallelism was set up; "
                "build the model outside zero.Init (create TrainingArguments(deepspeed=...) after the model)"
            )
        param.allreduce = False
        param.group_name = name
        if zero_stage == 3:
            mark_zero3_expert_placement(param, name)
    return len(expert_params)


def attach_moe_marker(model: nn.Module, expert_parallel_size: int, num_experts: int) -> None:
    """A parameter-free `deepspeed.moe.layer.MoE` (`mixtral_compat.deepspeed.moe_marker`), so the engine
    runs its MoE gradient path for our model; it checks the `ep_size_N` groups when the engine sets up
    parallelism."""
    if not any(isinstance(m, moe_marker_class()) for m in model.modules()):
        marker = moe_marker(
            expert_parallel_size,
            expert_group_name(expert_parallel_size),
            num_experts,
            lambda: check_deepspeed_expert_groups(expert_parallel_size),
        )
        model.add_module("deepspeed_moe_marker", marker)


def check_zero_config_for_moe(ds_config: dict) -> None:
    """DeepSpeed's ZeRO-1/2 MoE path needs reduce-scatter and (stage 2) contiguous gradients."""
    zero = ds_config.get("zero_optimization", {})
    for key in ("reduce_scatter", "contiguous_gradients"):
        if zero.get(key, True) is False:
            raise ValueError(
                f"zero_optimization.{key}=false is not supported with expert parallelism; set it to true"
            )
    if ds_config.get("use_data_before_expert_parallel_", False):
        raise ValueError(
            "use_data_before_expert_parallel_ is not supported with our expert parallelism; remove it"
        )


def moe_param_groups(params) -> list[dict]:
    """Optimizer parameter groups split the DeepSpeed way: expert parameters in groups of their own
    (`moe=True`, `name="ep_size_N"`), the rest where they were. Accepts parameters or groups."""
    params = list(params)
    if params and not isinstance(params[0], dict):
        params = [{"params": params}]
    named = [
        {**group, "name": group.get("name", f"group{i}"), "params": list(group["params"])}
        for i, group in enumerate(params)
    ]
    return [group for group in split_params_into_different_moe_groups_for_optimizer(named) if group["params"]]


def moe_optimizer(optimizer):
    """The same torch optimizer rebuilt over `moe_param_groups` of its groups (before its first step).

    Returned unchanged when it has no expert parameters, is already split, or is not a torch optimizer
    (accelerate's DummyOptim: DeepSpeed builds that one and splits it itself, seeing the marker)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    param_groups = optimizer.param_groups
    if any("moe" in group for group in param_groups):
        return optimizer
    if not any(is_moe_param(p) for group in param_groups for p in group["params"]):
        return optimizer
    if optimizer.state:
        raise ValueError("moe_optimizer must be applied before the optimizer's first step")
    accepted = inspect.signature(type(optimizer).__init__).parameters
    defaults = {key: value for key, value in optimizer.defaults.items() if key in accepted}
    return type(optimizer)(moe_param_groups(param_groups), **defaults)


def gathered_state_dict(model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """This rank's state dict on the CPU with every ZeRO-3 partition gathered, one tensor at a time
    (trainable_only: only the parameters that train, e.g. a PEFT model's adapters).

    Collective: call on every rank. Under expert parallelism each rank's dict holds its own experts;
    pass it to `model.save_pretrained(dir, state_dict=...)` on every rank, which merges the experts on
    rank 0 (checkpoint.py). DeepSpeed's own consolidated state dict (what HF Trainer saves) holds only
    rank 0's experts.
    """
    state = {}
    entries = model.state_dict(keep_vars=True).items()
    if trainable_only:
        entries = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    for name, value in entries:
        with GatheredParameters([value] if hasattr(value, "ds_id") else []):
            state[name] = value.detach().to("cpu", copy=True)
    return state


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def prepare_for_deepspeed(
    model: nn.Module, ds_config: dict, expert_parallel: ExpertParallelGroups | None = None
) -> tuple[nn.Module, list]:
    """Make `model` train under `ds_config` with the gradient rule of this module.

    Call after torch.distributed is initialised and the model is built, made expert-parallel if it is
    to be (`parallel.parallelize_experts`) and PEFT-wrapped, before `deepspeed.initialize` or
    `Trainer(...)`. `expert_parallel`: the groups the model was made expert-parallel with (None: it was
    not), checked against the model's blocks. PEFT is recognised by the model's `peft_config`.
    Returns the model (changed in place) and the `model_parameters` for `deepspeed.initialize`: the
    trainable parameters, split into DeepSpeed MoE groups under expert parallelism.
    """
    check_expert_parallel_layout(model, expert_parallel)
    expert_parallel_size = 1 if expert_parallel is None else expert_parallel.size
    zero_stage = zero_stage_of(ds_config)
    check_parallel_combination(zero_stage, expert_parallel_size, peft=hasattr(model, "peft_config"))
    if zero_stage == 3:
        set_z3_leaf_modules(model, [SparseMoeBlock])
    if expert_parallel_size == 1:
        return model, trainable_parameters(model)
    check_zero_config_for_moe(ds_config)
    register_expert_groups_with_deepspeed(expert_parallel)
    mark_expert_parameters(model, expert_parallel_size, zero_stage)
    if zero_stage < 3 and any(p.requires_grad for _, p in named_expert_parameters(model)):
        num_experts = next(m.num_experts for m in model.modules() if isinstance(m, SparseMoeBlock))
        attach_moe_marker(model, expert_parallel_size, num_experts)
    return model, moe_param_groups(trainable_parameters(model))
