"""Every use of deepspeed internals (private or undocumented names) in this project, in one place.

CHECKED is the range of deepspeed versions these were checked against; `mixtral_compat.check_versions()`
refuses others at start-up with one line. Code elsewhere calls the functions here, never the
internals themselves. Nothing here imports deepspeed at module import (the model package uses the
ZeRO-3 parameter tests without it).

- `adopt_expert_groups`, `expert_groups`: `deepspeed.utils.groups` keeps its expert-parallel and
  expert-data-parallel process groups and their ranks in private tables
  (`_get_expert_parallel_group_dict`, `_EXPERT_PARALLEL_GROUP_RANKS`, and the data-parallel pair)
  with no public way to adopt groups that already exist; its MoE code looks them up by name.
- `MoEMarker`: a `deepspeed.moe.layer.MoE` subclass that skips `MoE.__init__` (which builds DeepSpeed's
  own gate and experts) and sets only the attributes the engine reads from an MoE layer (`ep_size`,
  `expert_group_name`, `num_experts`, `num_local_experts`, `use_residual`,
  `enable_expert_tensor_parallelism`) and `set_deepspeed_parallelism`, which the engine calls.
- `mark_zero3_expert_placement`: DeepSpeed 0.19's AutoEP parameter attributes
  (`ds_zero_placement_family`, `ds_zero_partition_group_name`, `ds_zero_partition_process_group`),
  read by ZeRO-3's parameter conversion and optimizer.
- `copy_master_weights_to_model`: the ZeRO-1/2 optimizer's `update_lp_params`.
- `is_zero3_partitioned`, `zero3_data_present`: ZeRO-3's per-parameter attributes `ds_id` and `ds_status`.
"""

from collections.abc import Callable

import torch
from torch import nn

PACKAGE = "deepspeed"
CHECKED = ">=0.19,<0.20"

ZERO3_EXPERT_PLACEMENT = "autoep_expert"


def is_zero3_partitioned(param: torch.Tensor) -> bool:
    """A parameter ZeRO-3 (zero.Init or the engine) has partitioned."""
    return hasattr(param, "ds_id")


def zero3_data_present(weight: torch.Tensor) -> bool:
    """False for a ZeRO-3 partition whose full data is not present right now (outside its gather)."""
    status = getattr(weight, "ds_status", None)
    return status is None or status.name in ("AVAILABLE", "INFLIGHT") and weight.numel() > 0


def expert_groups(name: str):
    """DeepSpeed's (expert-parallel, expert-data-parallel) process groups named `name`, or None."""
    from deepspeed.utils import groups

    if name not in groups._get_expert_parallel_group_dict():
        return None
    return groups._get_expert_parallel_group(name), groups._get_expert_data_parallel_group(name)


def adopt_expert_groups(name: str, ep_group, ep_ranks: list[int], edp_group, edp_ranks: list[int]) -> None:
    """Register existing process groups as DeepSpeed's `name` groups (a name already there is kept)."""
    from deepspeed.utils import groups

    if name in groups._get_expert_parallel_group_dict():
        return
    groups._get_expert_parallel_group_dict()[name] = ep_group
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = ep_ranks
    groups._get_expert_data_parallel_group_dict()[name] = edp_group
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = edp_ranks


def mark_zero3_expert_placement(param: nn.Parameter, group_name: str) -> None:
    """Make ZeRO-3 partition `param` over the `group_name` expert-data-parallel group only (AutoEP)."""
    from deepspeed.utils import groups

    param.ds_zero_placement_family = ZERO3_EXPERT_PLACEMENT
    param.ds_zero_partition_group_name = group_name
    param.ds_zero_partition_process_group = groups._get_expert_data_parallel_group(group_name)


def copy_master_weights_to_model(engine) -> None:
    """ZeRO-1/2: overwrite the model's (low-precision) parameters with the optimizer's fp32 masters.
    Collective."""
    engine.optimizer.update_lp_params()


def moe_marker_class() -> type:
    """`MoEMarker`, defined on first use (it subclasses deepspeed.moe.layer.MoE)."""
    global _MOE_MARKER
    if _MOE_MARKER is None:
        from deepspeed.moe.layer import MoE

        class MoEMarker(MoE):
            """A parameter-free `deepspeed.moe.layer.MoE`: the engine reduces MoE parameter groups over
            their expert-data-parallel group only when it finds one among the model's modules
            (`has_moe_layers`). It names the `group_name` groups and, when the engine sets up
            parallelism, runs `check_groups`; it holds no experts, so DeepSpeed's per-expert
            checkpoint files stay empty."""

            def __init__(self, expert_parallel_size: int, group_name: str, num_experts: int, check_groups):
                nn.Module.__init__(self)  # MoE.__init__ would build DeepSpeed's own gate and experts.
                self.ep_size = expert_parallel_size
                self.expert_group_name = group_name
                self.num_experts = num_experts
                self.num_local_experts = 0
                self.use_residual = False
                self.enable_expert_tensor_parallelism = False
                self.check_groups = check_groups

            def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
                self.check_groups()

            def forward(self, *args, **kwargs):
                raise RuntimeError("MoEMarker only marks the model for DeepSpeed; it has no forward")

        _MOE_MARKER = MoEMarker
    return _MOE_MARKER


_MOE_MARKER: type | None = None


def moe_marker(
    expert_parallel_size: int, group_name: str, num_experts: int, check_groups: Callable[[], None]
) -> nn.Module:
    """A module that makes DeepSpeed's engine run its MoE gradient path (see `moe_marker_class`)."""
    return moe_marker_class()(expert_parallel_size, group_name, num_experts, check_groups)


# --- faults: ZeRO-3 partitions and checkpoint loading (issue 17) ---


def local_parameter_data(param):
    """The values of `param` this rank holds: its ZeRO-3 partition (`ds_tensor`) when DeepSpeed
    partitioned it, else the parameter itself."""
    return param.ds_tensor if hasattr(param, "ds_id") and hasattr(param, "ds_tensor") else param


def route_checkpoint_engine_loads(load) -> None:
    """Idempotent: DeepSpeed's TorchCheckpointEngine.load (every model/optimizer state file of a
    DeepSpeed checkpoint, read with torch.load(weights_only=False)) calls `load(path, map_location)`
    instead."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if getattr(TorchCheckpointEngine.load, "_routed", False):
        return

    def routed_load(self, path: str, map_location=None):
        return load(path, map_location=map_location)

    routed_load._routed = True
    TorchCheckpointEngine.load = routed_load
