"""Worker: a few optimizer steps of the tiny MoE model under DeepSpeed on gloo ranks (2 or 4), held
against a single-process reference that sees the same global batch.

The reference runs every rank's micro-batch through one model and steps on the mean of the ranks'
losses -- the gradient rule (dense grads averaged over data parallel, expert grads summed over their
expert-data-parallel group and divided by the data-parallel size) written out by hand. Rank 0 writes
the max parameter differences, losses and step times to --out as JSON.

    torchrun --nproc_per_node 2 tests/distributed/ds_train_parity.py --zero-stage 3 --out result.json
"""

import argparse
import copy
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import deepspeed
import torch
from peft import LoraConfig, get_peft_model
from torch import distributed as dist

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]

from mixtral_reference import tiny_config  # noqa: E402

from mixtral_model import MixtralConfig, MixtralForCausalLM, moe  # noqa: E402
from mixtral_model.moe import Router  # noqa: E402
from mixtral_parallel.deepspeed_moe import gathered_state_dict, prepare_for_deepspeed  # noqa: E402
from mixtral_parallel.expert_parallel import new_expert_parallel_groups, parallelize_experts  # noqa: E402
from mixtral_parallel.expert_state import load_expert_parallel_adapter, save_expert_parallel_adapter  # noqa: E402

MICRO_BATCH, SEQ = 2, 16
SKEW_BIAS = 30.0
CLIP_NORM = 1.0  # DeepSpeed's default; the reference clips the global gradient norm the same way


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--zero-stage", type=int, required=True)
    parser.add_argument("--expert-parallel-size", type=int, default=1)
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="adamw")
    parser.add_argument("--peft", action="store_true", help="train LoRA adapters on attention and experts")
    parser.add_argument(
        "--persistence-threshold",
        type=int,
        default=0,
        help="ZeRO-3: parameters this small are never partitioned",
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--skew-rank", type=int, default=-1, help="this rank routes every token to experts 0 and 1"
    )
    parser.add_argument(
        "--skip-prepare",
        action="store_true",
        help="negative control: no prepare_for_deepspeed (no leaf modules, no MoE groups)",
    )
    parser.add_argument(
        "--skip-idle-experts",
        action="store_true",
        help="experts with no tokens are not called (as an expert loop may)",
    )
    parser.add_argument(
        "--expert-backend", default="auto", help="SparseMoeBlock.expert_backend of the model DeepSpeed trains"
    )
    parser.add_argument(
        "--save-adapter",
        help="with --peft: save the trained adapter (one complete adapter under EP) and the reference's "
        "adapter and base model under this directory, and load the adapter back into a fresh model",
    )
    parser.add_argument("--out", required=True)
    return parser.parse_args()


def ds_config(args) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {
            "stage": args.zero_stage,
            "stage3_param_persistence_threshold": args.persistence_threshold,
        },
        "gradient_clipping": CLIP_NORM,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10_000,
    }
    if args.optimizer == "adamw":
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": 1e-2, "weight_decay": 0.01, "eps": 1e-6, "torch_adam": True},
        }
    return config


def reference_optimizer(args, params):
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01, eps=1e-6)
    return torch.optim.SGD(params, lr=0.5)


def micro_batch(step: int, rank: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, vocab, (MICRO_BATCH, SEQ), generator=g)


@contextmanager
def skewed_routing(model, enabled: bool, seen_experts: set):
    """While enabled, every router's logits favour experts 0 and 1 by SKEW_BIAS: experts 2.. get no tokens."""

    def bias_logits(module, inputs, logits_NE):
        bias_E = torch.full((logits_NE.shape[-1],), -SKEW_BIAS)
        bias_E[:2] = SKEW_BIAS
        biased = logits_NE + bias_E
        seen_experts.update(biased.topk(2, dim=-1).indices.unique().tolist())
        return biased

    handles = (
        [m.register_forward_hook(bias_logits) for m in model.modules() if isinstance(m, Router)]
        if enabled
        else []
    )
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_busy_experts(experts, x_sorted_MD, counts):
    """moe.per_expert_forward, but an expert with no tokens is never called."""
    slices = torch.split(x_sorted_MD, counts, dim=0)
    return torch.cat([expert(x) if len(x) else x for expert, x in zip(experts, slices, strict=True)], dim=0)


def loss_of(model, input_ids):
    return model(input_ids=input_ids, labels=input_ids, output_router_logits=True, use_cache=False).loss


def train_deepspeed(args, model, rank):
    config = ds_config(args)
    if args.skip_prepare:
        model, params = model, [p for p in model.parameters() if p.requires_grad]
    else:
        model, params = prepare_for_deepspeed(model, config, model.expert_parallel)
    client_optimizer = None if args.optimizer == "adamw" else reference_optimizer(args, params)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=params, optimizer=client_optimizer, config=config
    )
    losses, step_seconds, seen_experts = [], [], set()
    for step in range(args.steps):
        start = time.perf_counter()
        with skewed_routing(engine.module, rank == args.skew_rank, seen_experts):
            loss = loss_of(engine, micro_batch(step, rank, model.config.vocab_size))
        engine.backward(loss)
        engine.step()
        step_seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
    return engine, losses, step_seconds, sorted(seen_experts)


def train_reference(args, model, world):
    optimizer = reference_optimizer(args, model.parameters())
    losses = []
    for step in range(args.steps):
        optimizer.zero_grad()
        step_losses = []
        for rank in range(world):
            with skewed_routing(model, rank == args.skew_rank, set()):
                loss = loss_of(model, micro_batch(step, rank, model.config.vocab_size))
            (loss / world).backward()
            step_losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
        optimizer.step()
        losses.append(step_losses)
    return losses


def with_lora(model):
    """LoRA on q_proj, v_proj and every expert's w1/w2/w3."""
    torch.manual_seed(1)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "w1", "w2", "w3"]
    )
    return get_peft_model(model, config)


def build_models(expert_parallel_size: int, peft: bool = False):
    """The model to train (holding this rank's experts under EP) and a full single-process reference,
    both with the weights of one seeded full model (and the same LoRA adapters with --peft)."""
    torch.manual_seed(0)
    reference = MixtralForCausalLM(MixtralConfig(**tiny_config(intermediate_size=48)))
    reference = with_lora(reference) if peft else reference
    if expert_parallel_size == 1:
        return copy.deepcopy(reference), reference
    model = MixtralForCausalLM(MixtralConfig(**tiny_config(intermediate_size=48)))
    parallelize_experts(model, new_expert_parallel_groups(expert_parallel_size))
    model = with_lora(model) if peft else model
    full_state = reference.state_dict()
    model.load_state_dict({name: full_state[name] for name in model.state_dict()})
    return model, reference


def local_parameters(engine) -> dict[str, torch.Tensor]:
    """This rank's parameters of the trained model, gathered from their ZeRO-3 partitions if partitioned."""
    params = {n: p for n, p in engine.module.named_parameters()}
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {name: p.detach().clone() for name, p in params.items()}


def partition_ranks(engine) -> dict[str, list[int]]:
    """Under ZeRO-3: the ranks each kind of parameter is partitioned over (first expert, first dense)."""
    found = {}
    for name, param in engine.module.named_parameters():
        kind = "expert" if ".experts." in name else "dense"
        if hasattr(param, "ds_process_group") and kind not in found:
            found[kind] = dist.get_process_group_ranks(param.ds_process_group)
    return found


def merge_ranks(per_rank: list[dict]) -> tuple[dict, float]:
    """One full parameter dict from every rank's (experts from their owners), and the largest difference
    between ranks' copies of a parameter they share (0 when data parallelism keeps them in step)."""
    merged, spread = {}, 0.0
    for params in per_rank:
        for name, value in params.items():
            if name in merged:
                spread = max(spread, (merged[name] - value).abs().max().item())
            else:
                merged[name] = value
    return merged, spread


def compare(trained: dict, reference_model) -> dict:
    worst_name, worst_abs, worst_rel = None, 0.0, 0.0
    for name, expected in reference_model.named_parameters():
        diff = (trained[name] - expected.detach()).abs().max().item()
        rel = diff / max(expected.detach().abs().max().item(), 1e-12)
        if diff > worst_abs:
            worst_name, worst_abs = name, diff
        worst_rel = max(worst_rel, rel)
    trainable = [name for name, p in reference_model.named_parameters() if p.requires_grad]
    return {
        "max_abs_diff": worst_abs,
        "max_rel_diff": worst_rel,
        "worst_param": worst_name,
        "trainable_params": len(trainable),
        "trainable_expert_params": sum(".experts." in name for name in trainable),
    }


def record_expert_paths(paths: set) -> None:
    """Note which expert path the MoE blocks run: 'per_expert' module calls or the 'grouped' read of
    the weights (which needs the block's ZeRO-3 partitions gathered)."""
    per_expert, grouped = moe.per_expert_forward, moe.grouped_swiglu

    def per_expert_recording(*args):
        paths.add("per_expert")
        return per_expert(*args)

    def grouped_recording(*args):
        paths.add("grouped")
        return grouped(*args)

    moe.per_expert_forward, moe.grouped_swiglu = per_expert_recording, grouped_recording


def save_adapter(engine, args) -> None:
    """Collective: the trained adapter to DIR/adapter (one complete adapter, every expert)."""
    directory = Path(args.save_adapter) / "adapter"
    state = gathered_state_dict(engine.module, trainable_only=True)
    if args.expert_parallel_size > 1:
        save_expert_parallel_adapter(engine.module, engine.module.expert_parallel, directory, state)
    elif dist.get_rank() == 0:
        engine.module.save_pretrained(directory, state_dict=state)


def reload_adapter_difference(args, trained: dict[str, torch.Tensor]) -> float:
    """Max |loaded - trained| over this rank's adapter tensors, loading DIR/adapter into a fresh model
    of the same layout (this rank's experts only under EP)."""
    fresh, _ = build_models(args.expert_parallel_size, peft=True)
    load_expert_parallel_adapter(fresh, fresh.expert_parallel, Path(args.save_adapter) / "adapter")
    lora = {name: p for name, p in fresh.named_parameters() if "lora_" in name}
    assert lora and set(lora) <= set(trained), sorted(set(lora) - set(trained))[:3]
    return max((p.detach() - trained[name]).abs().max().item() for name, p in lora.items())


def save_reference(args, reference) -> None:
    """The reference's trained adapter (DIR/reference_adapter) and its base weights (DIR/base)."""
    directory = Path(args.save_adapter)
    reference.save_pretrained(directory / "reference_adapter")
    torch.manual_seed(0)
    MixtralForCausalLM(MixtralConfig(**tiny_config(intermediate_size=48))).save_pretrained(directory / "base")


def main():
    args = parse_args()
    if args.skip_idle_experts:
        moe.per_expert_forward = run_busy_experts
    paths = set()
    record_expert_paths(paths)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, reference = build_models(args.expert_parallel_size, args.peft)
    for module in model.modules():
        if isinstance(module, moe.SparseMoeBlock):
            module.expert_backend = args.expert_backend
    engine, losses, step_seconds, seen_experts = train_deepspeed(args, model, rank)
    print(f"rank {rank} expert paths {sorted(paths)}", flush=True)
    if args.save_adapter:
        save_adapter(engine, args)
    per_rank = [None] * world
    dist.all_gather_object(per_rank, (local_parameters(engine), losses, partition_ranks(engine)))
    reloaded = [None] * world
    if args.save_adapter:
        dist.all_gather_object(reloaded, reload_adapter_difference(args, per_rank[rank][0]))
    if rank == 0:
        trained, spread = merge_ranks([params for params, _, _ in per_rank])
        all_losses = [rank_losses for _, rank_losses, _ in per_rank]
        reference_losses = train_reference(args, reference, world)
        result = compare(trained, reference)
        result.update(
            replica_spread=spread,
            zero3_partition_ranks=[ranks for _, _, ranks in per_rank],
            losses=[list(step) for step in zip(*all_losses, strict=True)],
            reference_losses=reference_losses,
            step_seconds=step_seconds,
            reloaded_adapter_diff=reloaded,
        )
        if args.save_adapter:
            save_reference(args, reference)
        Path(args.out).write_text(json.dumps(result, indent=1))
    if rank == args.skew_rank:
        print(f"rank {rank} routed to experts {seen_experts}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
