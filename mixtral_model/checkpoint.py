"""Strict hub-layout checkpoint loading, and saving under expert parallelism.

PreTrainedModel.from_pretrained does the reading (single-file or sharded safetensors, meta-device
init, DeepSpeed zero.Init, bitsandbytes); this mixin turns its warnings into errors: a missing,
unexpected or wrongly shaped key, or an unreadable file, stops the load with the key named,
instead of leaving random weights in place.

Expert parallelism: `from_pretrained(path, expert_parallel_size=n)` is a convenience over
`parallel.parallelize_experts`: the model is built on the meta device with every expert, made
expert-parallel, and only then read, so a rank reads only its own experts' tensors; the keys of the
experts other ranks hold (and only those) are expected to be left over. `save_pretrained` of an
expert-parallel model gathers every expert to rank 0, which writes one complete hub-layout checkpoint
(the config holds no parallel layout: the layout is a launch choice).

PEFT adapters under expert parallelism follow the same rule: `save_expert_parallel_adapter` gathers
every expert's lora_A/lora_B to rank 0, which writes one complete adapter with PEFT's key names (it
loads onto transformers' Mixtral and onto ours at any EP size), and `load_expert_parallel_adapter`
reads an adapter into an EP model, each rank taking only its own experts' tensors.
"""

import re
from contextvars import ContextVar
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import PreTrainedModel

from .parallel import (
    ExpertParallelGroups,
    expert_parallel_of,
    moe_blocks,
    new_expert_parallel_groups,
    parallelize_experts,
)

EXPERT_KEY = re.compile(r"^(?P<experts>.*\.block_sparse_moe\.experts)\.(?P<expert>\d+)\.(?P<suffix>.+)$")


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: names the offending keys or file."""


def _describe(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def loading_problem(info: dict, path) -> str | None:
    """What does not match, in one line, or None."""
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing keys: {_describe(info['missing_keys'])}")
    if info.get("unexpected_keys"):
        problems.append(f"unexpected keys: {_describe(info['unexpected_keys'])}")
    if info.get("mismatched_keys"):
        mismatched = [
            f"{key} {tuple(found)} != expected {tuple(want)}" for key, found, want in info["mismatched_keys"]
        ]
        problems.append(f"wrongly shaped keys: {_describe(mismatched)}")
    if not problems:
        return None
    return f"checkpoint {path} does not match the model config: " + "; ".join(problems)


def problem_on_any_rank(problem: str | None) -> str | None:
    """Under expert parallelism ranks read different tensors: the first rank's problem, raised on every
    rank (so none goes on to wait in a collective for a rank that stopped)."""
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    return next((f"rank {rank}: {p}" for rank, p in enumerate(problems) if p), None)


def looks_like_local_path(name_or_path) -> bool:
    """A hub id is `name` or `namespace/name`; anything else (absolute, ./, ~, deeper, or a data file
    name: .jsonl/.json/.parquet) is a local path. The one rule for models, tokenizers and datasets."""
    text = str(name_or_path)
    return (
        not isinstance(name_or_path, str)
        or text.startswith(("/", ".", "~"))
        or text.count("/") > 1
        or Path(text).suffix in (".jsonl", ".json", ".parquet")
    )


def check_checkpoint_path(name_or_path) -> None:
    if looks_like_local_path(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(f"checkpoint directory {name_or_path} does not exist: check the path")


# The groups `from_pretrained(..., expert_parallel_size=n)` parallelizes over, for the duration of that
# call only: transformers' from_pretrained has no argument that reaches the step between building the
# model on the meta device and reading the weights (`_load_pretrained_model`).
_LOADING_EXPERT_PARALLEL: ContextVar[ExpertParallelGroups | None] = ContextVar(
    "loading_expert_parallel", default=None
)


class CheckpointLoadingMixin:
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *args,
        expert_parallel_size: int = 1,
        output_loading_info: bool = False,
        **kwargs,
    ):
        """PreTrainedModel.from_pretrained, strict (CheckpointError naming what does not match).

        expert_parallel_size=n > 1 (collective: every rank): creates the EP groups
        (`parallel.new_expert_parallel_groups`) and applies `parallel.parallelize_experts` to the
        model before its weights are read, so each rank reads only its own experts' tensors.
        """
        check_checkpoint_path(pretrained_model_name_or_path)
        groups = new_expert_parallel_groups(expert_parallel_size) if expert_parallel_size != 1 else None
        loading = _LOADING_EXPERT_PARALLEL.set(groups)
        try:
            # Mismatched shapes come back in the loading info, so the error below can name them.
            model, info = super().from_pretrained(
                pretrained_model_name_or_path,
                *args,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
                **kwargs,
            )
        except SafetensorError as error:
            raise CheckpointError(
                f"cannot read checkpoint {pretrained_model_name_or_path}: {error}"
            ) from error
        finally:
            _LOADING_EXPERT_PARALLEL.reset(loading)
        if groups is not None:
            pattern = re.compile(held_elsewhere_pattern(model))
            info["unexpected_keys"] = [k for k in info["unexpected_keys"] if not pattern.search(k)]
        problem = loading_problem(info, pretrained_model_name_or_path)
        if groups is not None:
            problem = problem_on_any_rank(problem)
        if problem:
            raise CheckpointError(problem)
        return (model, info) if output_loading_info else model

    @staticmethod
    def _load_pretrained_model(model, state_dict, checkpoint_files, load_config, expected_keys=None):
        """transformers' loading step, after the model is built (on the meta device) and before any weight
        is read: the place `from_pretrained(..., expert_parallel_size=n)` makes it expert-parallel."""
        groups = _LOADING_EXPERT_PARALLEL.get()
        if groups is not None:
            parallelize_experts(model, groups)
        return PreTrainedModel._load_pretrained_model(
            model, state_dict, checkpoint_files, load_config, expected_keys
        )

    def save_pretrained(self, save_directory, state_dict=None, **kwargs):
        """Under expert parallelism a collective (call it on every rank): rank 0 writes one complete
        hub-layout checkpoint; the other ranks write nothing and wait until it is written. HF Trainer
        calls save_pretrained on rank 0 only: under expert parallelism save through this method on every
        rank instead."""
        if expert_parallel_of(self) is None:
            return super().save_pretrained(save_directory, state_dict=state_dict, **kwargs)
        full_state_dict = gather_expert_parallel_state_dict(self, state_dict)
        if full_state_dict is not None:
            super().save_pretrained(save_directory, state_dict=full_state_dict, **kwargs)
        dist.barrier()


def held_elsewhere_pattern(model) -> str | None:
    """Regex of the checkpoint keys of the experts other EP ranks hold; None without expert parallelism."""
    if expert_parallel_of(model) is None:
        return None
    block = moe_blocks(model)[0]
    others = sorted(set(range(block.num_experts)) - set(block.local_expert_ids))
    return rf"(^|\.)layers\.\d+\.block_sparse_moe\.experts\.({'|'.join(map(str, others))})\."


def gather_expert_parallel_state_dict(model, state_dict=None) -> dict | None:
    """The complete hub-layout state dict on global rank 0, None on every other rank.

    state_dict: this rank's (default: model.state_dict()). Collective over the EP group of rank 0
    (ranks 0..n-1; ranks beyond return at once): each expert tensor travels as bytes, so any dtype
    does, and lands on rank 0's CPU.
    """
    groups = expert_parallel_of(model)
    n, group = groups.size, groups.expert_parallel
    if dist.get_rank() >= n:
        return None
    state_dict = model.state_dict() if state_dict is None else state_dict
    local_experts = moe_blocks(model)[0].local_expert_ids
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


def save_expert_parallel_adapter(peft_model, save_directory, state_dict: dict) -> None:
    """Collective over the EP group of rank 0 (call on every rank): one complete PEFT adapter in
    save_directory, written by rank 0; every rank waits until it is written.

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
    full = gather_expert_parallel_state_dict(peft_model, adapter)
    if full is not None:
        peft_model.save_pretrained(save_directory, state_dict=state_dict)
        weights = {key: value.contiguous() for key, value in full.items()}
        save_file(weights, str(Path(save_directory) / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    dist.barrier()


def local_expert_state_dict(model, state_dict: dict) -> dict:
    """state_dict without the expert tensors other EP ranks hold (all of it without expert parallelism)."""
    pattern = held_elsewhere_pattern(model)
    return (
        state_dict if pattern is None else {k: v for k, v in state_dict.items() if not re.search(pattern, k)}
    )


def load_expert_parallel_adapter(peft_model, adapter_directory, adapter_name: str = "default") -> None:
    """Load a complete adapter (adapter_model.safetensors) into a PeftModel, this rank's experts only.

    Every adapter tensor of the model must be in the file (CheckpointError naming the missing ones,
    raised on every rank); the other ranks' expert tensors in it are not copied.
    """
    from peft import set_peft_model_state_dict

    adapter = local_expert_state_dict(
        peft_model, load_file(str(Path(adapter_directory) / "adapter_model.safetensors"))
    )
    result = set_peft_model_state_dict(peft_model, adapter, adapter_name=adapter_name)
    missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
    problem = f"adapter {adapter_directory} lacks {_describe(missing)}" if missing else None
    if expert_parallel_of(peft_model) is not None:
        problem = problem_on_any_rank(problem)
    if problem:
        raise CheckpointError(problem)
