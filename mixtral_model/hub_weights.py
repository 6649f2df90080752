"""Strict hub-layout checkpoint loading (and the expert-parallel convenience of from_pretrained).

PreTrainedModel.from_pretrained does the reading (single-file or sharded safetensors, meta-device
init, DeepSpeed zero.Init, bitsandbytes); this mixin turns its warnings into errors: a missing,
unexpected or wrongly shaped key, or an unreadable file, stops the load with the key named,
instead of leaving random weights in place.

Expert parallelism: `from_pretrained(path, expert_parallel=groups)` (or `expert_parallel_size=n`, which
creates the groups) is a convenience over `mixtral_parallel.expert_parallel.parallelize_experts`: the
model is built on the meta device with every expert, made expert-parallel, and only then read, so a
rank reads only its own experts' tensors; the keys of the experts other ranks hold (and only those) are
expected to be left over. `save_pretrained` of an expert-parallel model (its groups: `model.expert_parallel`)
gathers every expert to rank 0, which writes one complete hub-layout checkpoint (the config holds no
parallel layout: the layout is a launch choice).

The gathering itself (and PEFT adapters under expert parallelism) lives in
mixtral_parallel/expert_state.py.
"""

import re
from contextvars import ContextVar
from pathlib import Path

import torch.distributed as dist
from safetensors import SafetensorError

# The module, not its names: mixtral_parallel.expert_parallel imports mixtral_model (its MoE block), so
# either package may be imported first.
from mixtral_parallel import expert_parallel as parallel


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
    name: .jsonl/.json/.parquet/.csv/.arrow) is a local path. The one rule for models, tokenizers and datasets."""
    text = str(name_or_path)
    return (
        not isinstance(name_or_path, str)
        or text.startswith(("/", ".", "~"))
        or text.count("/") > 1
        or Path(text).suffix in (".jsonl", ".json", ".parquet", ".csv", ".arrow")
    )


def check_checkpoint_path(name_or_path) -> None:
    if looks_like_local_path(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(f"checkpoint directory {name_or_path} does not exist: check the path")


# The groups `from_pretrained(..., expert_parallel_size=n)` parallelizes over, for the duration of that
# call only: transformers' from_pretrained has no argument that reaches the step between building the
# model on the meta device and reading the weights (`before_weights_are_read`).
_LOADING_EXPERT_PARALLEL: ContextVar["parallel.ExpertParallelGroups | None"] = ContextVar(
    "loading_expert_parallel", default=None
)


class CheckpointLoadingMixin:
    # This rank's `ExpertParallelGroups`, set by `parallelize_experts`; None: every expert is here.
    # (No annotation: transformers evaluates a model class's annotations when the class is defined.)
    expert_parallel = None

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *args,
        expert_parallel_size: int = 1,
        expert_parallel: "parallel.ExpertParallelGroups | None" = None,
        output_loading_info: bool = False,
        **kwargs,
    ):
        """PreTrainedModel.from_pretrained, strict (CheckpointError naming what does not match).

        expert_parallel=groups (collective: every rank): applies
        `mixtral_parallel.expert_parallel.parallelize_experts` with these groups to the model before its
        weights are read, so each rank reads only its own experts' tensors. expert_parallel_size=n > 1
        does the same with groups it creates (`new_expert_parallel_groups(n)`; the model's
        `expert_parallel` holds them).
        """
        from mixtral_parallel import expert_state  # imports this module

        check_checkpoint_path(pretrained_model_name_or_path)
        groups = expert_parallel
        if expert_parallel_size != 1:
            if groups is not None:
                raise ValueError("from_pretrained: pass expert_parallel_size or expert_parallel, not both")
            groups = parallel.new_expert_parallel_groups(expert_parallel_size)
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
            pattern = re.compile(expert_state.held_elsewhere_pattern(model, groups))
            info["unexpected_keys"] = [k for k in info["unexpected_keys"] if not pattern.search(k)]
        problem = loading_problem(info, pretrained_model_name_or_path)
        if groups is not None:
            problem = problem_on_any_rank(problem)
        if problem:
            raise CheckpointError(problem)
        return (model, info) if output_loading_info else model

    def before_weights_are_read(self) -> None:
        """Called by from_pretrained (`mixtral_compat.transformers.PreTrainedModelHooks`) after the model
        is built on the meta device and before any weight is read: where
        `from_pretrained(..., expert_parallel_size=n)` makes it expert-parallel."""
        groups = _LOADING_EXPERT_PARALLEL.get()
        if groups is not None:
            parallel.parallelize_experts(self, groups)

    def save_pretrained(self, save_directory, state_dict=None, **kwargs):
        """Under expert parallelism a collective (call it on every rank): rank 0 writes one complete
        hub-layout checkpoint; the other ranks write nothing and wait until it is written. HF Trainer
        calls save_pretrained on rank 0 only: under expert parallelism save through this method on every
        rank instead. The layout is the model's own (`self.expert_parallel`)."""
        if self.expert_parallel is None:
            return super().save_pretrained(save_directory, state_dict=state_dict, **kwargs)
        from mixtral_parallel import expert_state  # imports this module

        full_state_dict = expert_state.gather_expert_parallel_state_dict(
            self, self.expert_parallel, state_dict
        )
        if full_state_dict is not None:
            super().save_pretrained(save_directory, state_dict=full_state_dict, **kwargs)
        dist.barrier()
