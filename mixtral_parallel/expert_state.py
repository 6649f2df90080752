"""Expert-parallel state: every rank's experts gathered into one complete hub-layout state dict on
rank 0 (checkpoints and the final model), and PEFT adapters under expert parallelism.

`save_expert_parallel_adapter` gathers every expert's lora_A/lora_B to rank 0, which writes one
complete adapter with PEFT's key names (it loads onto transformers' Mixtral and onto ours at any EP
size), and `load_expert_parallel_adapter` reads an adapter into an EP model, each rank taking only
its own experts' tensors. Each takes the model's expert-parallel groups (`expert_parallel.
ExpertParallelGroups`, the value `parallelize_experts` was given) and checks them against the model.
"""

import re
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from mixtral_model.hub_weights import CheckpointError, _describe, problem_on_any_rank
from mixtral_parallel.expert_parallel import ExpertParallelGroups, check_expert_parallel_layout, moe_blocks

EXPERT_KEY = re.compile(r"^(?P<experts>.*\.block_sparse_moe\.experts)\.(?P<expert>\d+)\.(?P<suffix>.+)$")


def held_elsewhere_pattern(model, groups: ExpertParallelGroups | None) -> str | None:
    """Regex of the checkpoint keys of the experts other EP ranks hold; None without expert parallelism."""
    if groups is None:
        return None
    num_experts = moe_blocks(model)[0].num_experts
    others = sorted(set(range(num_experts)) - set(groups.local_experts(num_experts)))
    return rf"(^|\.)layers\.\d+\.block_sparse_moe\.experts\.({'|'.join(map(str, others))})\."


def gather_expert_parallel_state_dict(model, groups: ExpertParallelGroups, state_dict=None) -> dict | None:
    """The complete hub-layout state dict on global rank 0, None on every other rank.

    groups: the model's EP layout. state_dict: this rank's (default: model.state_dict()). Collective
    over the EP group of rank 0 (ranks 0..n-1; ranks beyond return at once): each expert tensor travels
    as bytes, so any dtype does, and lands on rank 0's CPU.
    """
    check_expert_parallel_layout(model, groups)
    n, group = groups.size, groups.expert_parallel
    if dist.get_rank() >= n:
        return None
    state_dict = model.state_dict() if state_dict is None else state_dict
    local_experts = groups.local_experts(moe_blocks(model)[0].num_experts)
    full, gathered_blocks = {}, set()
    for key, value in state_dict.items():
        match = EXPERT_KEY.match(key)
        if match is None:
            full[key] = value
        elif match["experts"] not in gathered_blocks:
            gathered_blocks.add(match["experts"])
            full.update(gather_block_experts(match["experts"], state_dict, local_experts, n, group))
    return full if dist.get_rank() == 0 else None


def gather_block_experts(prefix: str, state_dict, local_experts: list[int], n: int, group) -> dict:
    """`{prefix}.{e}.{suffix}` for every global expert e, in expert order (on rank 0; empty elsewhere)."""
    first = f"{prefix}.{local_experts[0]}."
    suffixes = [key[len(first) :] for key in state_dict if key.startswith(first)]
    gathered = {
        suffix: gather_to_rank0(
            torch.stack([state_dict[f"{prefix}.{e}.{suffix}"] for e in local_experts]), n, group
        )
        for suffix in suffixes
    }
    if dist.get_rank() != 0:
        return {}
    num_experts = n * len(local_experts)
    return {
        f"{prefix}.{e}.{suffix}": gathered[suffix][e].clone()
        for e in range(num_experts)
        for suffix in suffixes
    }


def gather_to_rank0(stacked_L: torch.Tensor, n: int, group) -> torch.Tensor | None:
    """The EP group's (L, ...) tensors concatenated in rank order (n*L, ...), on rank 0's CPU; None elsewhere."""
    as_bytes = stacked_L.contiguous().reshape(-1).view(torch.uint8)
    received = [torch.empty_like(as_bytes) for _ in range(n)] if dist.get_rank() == 0 else None
    dist.gather(as_bytes, received, dst=0, group=group)
    if received is None:
        return None
    return (
        torch.cat(received).cpu().view(stacked_L.dtype).reshape(n * stacked_L.shape[0], *stacked_L.shape[1:])
    )


def save_expert_parallel_adapter(
    peft_model, groups: ExpertParallelGroups, save_directory, state_dict: dict
) -> None:
    """Collective over the EP group of rank 0 (call on every rank): one complete PEFT adapter in
    save_directory, written by rank 0; every rank waits until it is written. groups: the model's EP
    layout.

    state_dict: this rank's adapter tensors with the PeftModel's own names (`...experts.E.w1.lora_A.
    default.weight`; ZeRO-3 partitions already gathered, e.g. `zero.gathered_state_dict`). PEFT picks
    a state dict's adapter entries by the model's own LoRA layers, which on one rank are that rank's
    experts only: so each rank selects its entries with PEFT, the experts are gathered here, and rank
    0 lets PEFT write the adapter config (and its own entries), then writes the complete tensors.
    """
    from peft import get_peft_model_state_dict
    from peft.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import save_file

    adapter = get_peft_model_state_dict(peft_model, state_dict=state_dict)
    full = gather_expert_parallel_state_dict(peft_model, groups, adapter)
    if full is not None:
        peft_model.save_pretrained(save_directory, state_dict=state_dict)
        weights = {key: value.contiguous() for key, value in full.items()}
        save_file(weights, str(Path(save_directory) / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    dist.barrier()


def local_expert_state_dict(model, groups: ExpertParallelGroups | None, state_dict: dict) -> dict:
    """state_dict without the expert tensors other EP ranks hold (all of it without expert parallelism)."""
    pattern = held_elsewhere_pattern(model, groups)
    return (
        state_dict if pattern is None else {k: v for k, v in state_dict.items() if not re.search(pattern, k)}
    )


def load_expert_parallel_adapter(
    peft_model, groups: ExpertParallelGroups | None, adapter_directory, adapter_name: str = "default"
) -> None:
    """Load a complete adapter (adapter_model.safetensors) into a PeftModel, this rank's experts only.

    groups: the model's EP layout (None: not expert-parallel). Every adapter tensor of the model must be
    in the file (CheckpointError naming the missing ones, raised on every rank); the other ranks' expert
    tensors in it are not copied.
    """
    from peft import set_peft_model_state_dict

    check_expert_parallel_layout(peft_model, groups)
    adapter = local_expert_state_dict(
        peft_model, groups, load_file(str(Path(adapter_directory) / "adapter_model.safetensors"))
    )
    result = set_peft_model_state_dict(peft_model, adapter, adapter_name=adapter_name)
    missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
    problem = f"adapter {adapter_directory} lacks {_describe(missing)}" if missing else None
    if groups is not None:
        problem = problem_on_any_rank(problem)
    if problem:
        raise CheckpointError(problem)
