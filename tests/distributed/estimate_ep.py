"""What a rank holds and sends under expert parallelism, for mixtral_tune/estimate.py to be held to.

    torchrun --nproc_per_node 2 tests/distributed/estimate_ep.py WORKDIR OUT.json

Every rank builds the pipelines' model (mixtral_tune.training.model_factory.build_model: tiny config, EP=2, LoRA on
attention and experts, fp32) and records the parameters it holds, by kind (dense / expert, base / LoRA).
Then one forward and backward of a micro-batch with activation checkpointing runs with
torch.distributed.all_to_all_single wrapped: the bytes of every token buffer (2-D tensors; the 1-D
per-expert counts are left out) handed to it, and the part of them addressed to the other rank.
Rank 0 writes every rank's numbers to OUT.json. Launched by tests/test_estimate.py.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2])]

from mixtral_model import load_tokenizer  # noqa: E402
from mixtral_parallel.expert_parallel import is_expert_param  # noqa: E402
from mixtral_tune.config import compose  # noqa: E402
from mixtral_tune.training.model_factory import build_model, expert_parallel_layout, write_random_init  # noqa: E402

MICRO_BATCH, SEQ_LEN = 2, 12


def overrides(workdir: Path) -> list[str]:
    """The run the test estimates (tests/test_estimate.py composes the same list)."""
    return [
        "+recipe=tiny/sft", f"output_dir={workdir}", "peft=lora", "peft.r=4", "peft.dropout=0",
        "model.expert_parallel_size=2", "model.dtype=float32", "model.architecture.hidden_size=32",
        "model.architecture.intermediate_size=48", "model.architecture.num_attention_heads=4",
        "model.architecture.num_key_value_heads=2", "model.architecture.num_local_experts=4",
        "model.architecture.num_hidden_layers=3",
    ]  # fmt: skip


def held(model) -> dict[str, int]:
    counts = {"dense_base": 0, "expert_base": 0, "dense_lora": 0, "expert_lora": 0}
    for name, param in model.named_parameters():
        kind = "expert" if is_expert_param(name) else "dense"
        counts[f"{kind}_{'lora' if 'lora_' in name else 'base'}"] += param.numel()
    counts["trainable_bytes"] = sum(
        p.numel() * p.element_size() for p in model.parameters() if p.requires_grad
    )
    counts["frozen_bytes"] = sum(
        p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad
    )
    return counts


def main(workdir: Path, out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = compose("sft", overrides(workdir))
    if rank == 0:
        write_random_init(cfg, load_tokenizer(None), workdir / "base", seed=0)
    dist.barrier()
    model = build_model(cfg, expert_parallel=expert_parallel_layout(cfg))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    report = held(model)

    sent = {"buffer_bytes": 0, "off_rank_bytes": 0, "calls": 0}
    original = dist.all_to_all_single

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        if input.dim() == 2:
            row_bytes = input.shape[1] * input.element_size()
            splits = input_split_sizes or [
                input.shape[0] // dist.get_world_size(group)
            ] * dist.get_world_size(group)
            me = dist.get_rank(group)
            sent["buffer_bytes"] += input.numel() * input.element_size()
            sent["off_rank_bytes"] += sum(rows for peer, rows in enumerate(splits) if peer != me) * row_bytes
            sent["calls"] += 1
        return original(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    dist.all_to_all_single = counting
    generator = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(3, 32000, (MICRO_BATCH, SEQ_LEN), generator=generator)
    model(input_ids=ids, labels=ids).loss.backward()
    dist.all_to_all_single = original
    report.update(sent)

    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    if rank == 0:
        out.write_text(json.dumps({str(r): values for r, values in enumerate(reports)}, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
