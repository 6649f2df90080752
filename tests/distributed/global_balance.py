"""Global-batch load balancing on 2 gloo ranks against one process on the concatenated batch.

    torchrun --nproc_per_node 2 tests/distributed/global_balance.py OUT.json

Every rank builds the same tiny model; rank r forwards micro-batch m*2 + r of four padded batches.
The reference is transformers' `load_balancing_loss_func` on one process: its value on the
concatenated batch, and its gradient. Cases:
- `dp`: one micro-batch per step: the rank-mean of the aux loss and of its gradient (as DDP averages)
  against the reference on the concatenation of both ranks' batches;
- `dp_accumulation`: two micro-batches per step: `step_loss()` against the reference on all four
  batches; the load fractions of the last micro-batch against the four batches' own; the gradient
  against the documented formula (mixtral_parallel/global_balance.py), each micro-batch's loss built
  from transformers' function on both ranks' micro-batch with f replaced by the fractions so far;
- `ep`: the same as `dp` on the model made expert-parallel (each rank holds half the experts):
  aux value and dense gradients (router included).
Also the per-step aux of micro-batch mode (to show the two modes differ here), and the cost: the
all-reduce alone and a forward+backward of the aux in each mode, medians. Rank 0 writes the JSON.
"""

import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2])]

from mixtral_reference import tiny_config  # noqa: E402

from mixtral_model import MixtralConfig, MixtralForCausalLM  # noqa: E402
from mixtral_model.testing import max_relative_diff  # noqa: E402
from mixtral_parallel.expert_parallel import (  # noqa: E402
    is_expert_param,
    new_expert_parallel_groups,
    parallelize_experts,
)
from mixtral_parallel.global_balance import use_global_batch_balance  # noqa: E402

WORLD, MICRO = 2, 2
E, K = 4, 2


def batches(vocab: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Four (input_ids, attention_mask) of 2 x 10 tokens with different padding (left and right)."""
    g = torch.Generator().manual_seed(11)
    out = []
    for k in range(WORLD * MICRO):
        input_ids = torch.randint(0, vocab, (2, 10), generator=g)
        mask = torch.ones_like(input_ids)
        mask[0, : k + 1] = 0  # left padding, a different amount in each batch
        if k:
            mask[1, 10 - 2 * k :] = 0  # and right padding in all but the first
        out.append((input_ids, mask))
    return out


def concat(parts):
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def new_model() -> MixtralForCausalLM:
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**tiny_config(num_local_experts=E, num_experts_per_tok=K)))
    model.config._attn_implementation = "eager"
    return model


def aux_of(model, input_ids, mask) -> torch.Tensor:
    return model(input_ids=input_ids, attention_mask=mask, output_router_logits=True).aux_loss


def rank_mean_grads(model) -> dict[str, torch.Tensor]:
    """Every parameter's grad averaged over the ranks, as DDP/DeepSpeed average them."""
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        grad = grad.clone()
        dist.all_reduce(grad)
        grads[name] = grad / WORLD
    return grads


def reference_grads(model, loss) -> dict[str, torch.Tensor]:
    names, params = zip(*model.named_parameters(), strict=True)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {
        n: g if g is not None else torch.zeros_like(p) for n, p, g in zip(names, params, grads, strict=True)
    }


def grad_diff(actual: dict, expected: dict, dense_only: bool = False) -> float:
    names = [n for n in actual if not (dense_only and is_expert_param(n))]
    return max(max_relative_diff(actual[n], expected[n]) for n in names)


def rank_mean(value: torch.Tensor) -> torch.Tensor:
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / WORLD


def load_fractions(router_logits, mask) -> torch.Tensor:
    """Share of (layer, real token, k) assignments per expert, computed here with torch ops."""
    weight = mask.reshape(-1).float()
    counts = torch.zeros(E)
    for logits in router_logits:
        chosen = torch.topk(logits.float().softmax(-1), K, dim=-1).indices
        counts += torch.zeros(E).scatter_add_(0, chosen.reshape(-1), weight.repeat_interleave(K))
    return counts / (weight.sum() * len(router_logits))


def case_dp(rank: int, data) -> dict:
    model = new_model()
    load = use_global_batch_balance(model)
    load.new_step()
    aux = aux_of(model, *data[rank])
    aux.backward()
    reference = new_model()
    input_ids, mask = concat(data[:WORLD])
    out = reference(input_ids=input_ids, attention_mask=mask, output_router_logits=True)
    expected = load_balancing_loss_func(out.router_logits, E, K, mask)
    plain = aux_of(new_model(), *data[rank])  # micro-batch mode: this rank's batch alone
    return {
        "aux_rank_mean": rank_mean(aux).item(),
        "aux_reference": expected.item(),
        "aux_micro_batch_mode_rank_mean": rank_mean(plain).item(),
        "aux_diff": max_relative_diff(rank_mean(aux), expected.detach()),
        "step_loss_diff": max_relative_diff(load.step_loss(), expected.detach()),
        "grad_diff": grad_diff(rank_mean_grads(model), reference_grads(reference, expected)),
    }


def case_dp_accumulation(rank: int, data) -> dict:
    model = new_model()
    load = use_global_batch_balance(model)
    load.new_step()
    fractions_used = []
    for m in range(MICRO):
        input_ids, mask = data[m * WORLD + rank]
        out = model(input_ids=input_ids, attention_mask=mask, output_router_logits=True)
        fractions_used.append(load.sums[:E] / load.sums[-1])
        (out.aux_loss / MICRO).backward()  # the Trainer's mean over the step's micro-batches
    reference = new_model()
    everything = concat(data)
    out_all = reference(input_ids=everything[0], attention_mask=everything[1], output_router_logits=True)
    expected_value = load_balancing_loss_func(out_all.router_logits, E, K, everything[1])
    # The documented gradient: micro-batch m's loss is transformers' loss on both ranks' micro-batch m,
    # with its load fractions replaced by those of micro-batches 1..m of both ranks.
    expected_loss, seen = 0.0, []
    for m in range(MICRO):
        input_ids, mask = concat(data[m * WORLD : (m + 1) * WORLD])
        seen.append((input_ids, mask))
        out = reference(input_ids=input_ids, attention_mask=mask, output_router_logits=True)
        with torch.no_grad():
            seen_ids, seen_mask = concat(seen)
            seen_logits = reference(input_ids=seen_ids, attention_mask=seen_mask, output_router_logits=True)
            f_so_far = load_fractions(seen_logits.router_logits, seen_mask)
        f_own = load_fractions(out.router_logits, mask)
        own = load_balancing_loss_func(out.router_logits, E, K, mask)
        # transformers' loss is E * sum f_own * P (f_own constant): rescale each expert's term.
        probs = torch.stack([lg.float().softmax(-1) for lg in out.router_logits])
        p_E = (probs * mask.reshape(1, -1, 1)).sum((0, 1)) / (mask.sum() * len(out.router_logits))
        assert torch.allclose(own, E * (f_own * p_E).sum(), rtol=1e-5)
        expected_loss = expected_loss + E * (f_so_far * p_E).sum() / MICRO
    grads = rank_mean_grads(model)
    plain_model = new_model()
    plain = sum(aux_of(plain_model, *data[m * WORLD + rank]) for m in range(MICRO)) / MICRO
    return {
        "step_loss": load.step_loss().item(),
        "aux_reference": expected_value.item(),
        "aux_micro_batch_mode_rank_mean": rank_mean(plain).item(),
        "step_loss_diff": max_relative_diff(load.step_loss(), expected_value.detach()),
        "last_fractions_diff": max_relative_diff(
            fractions_used[-1], load_fractions(out_all.router_logits, everything[1])
        ),
        "first_fractions_vs_global": max_relative_diff(
            fractions_used[0], load_fractions(out_all.router_logits, everything[1])
        ),
        "grad_diff": grad_diff(grads, reference_grads(reference, expected_loss)),
        # for the record: how far the causal formula's gradient is from the concatenated batch's
        "grad_diff_vs_concatenated": grad_diff(grads, reference_grads(reference, expected_value)),
    }


def case_ep(rank: int, data) -> dict:
    reference = new_model()
    model = parallelize_experts(copy.deepcopy(reference), new_expert_parallel_groups(WORLD))
    load = use_global_batch_balance(model)
    load.new_step()
    aux = aux_of(model, *data[rank])
    aux.backward()
    input_ids, mask = concat(data[:WORLD])
    out = reference(input_ids=input_ids, attention_mask=mask, output_router_logits=True)
    expected = load_balancing_loss_func(out.router_logits, E, K, mask)
    dense = {n: g for n, g in rank_mean_grads(model).items() if not is_expert_param(n)}
    return {
        "aux_diff": max_relative_diff(rank_mean(aux), expected.detach()),
        "dense_grad_diff": grad_diff(dense, reference_grads(reference, expected)),
    }


def cost(rank: int, data, repeats: int = 50) -> dict:
    """Medians in milliseconds: the all-reduce of 2E+1 floats alone; forward + aux backward per mode."""
    buffer = torch.zeros(2 * E + 1)
    timings = {"all_reduce_ms": [], "micro_batch_step_ms": [], "global_batch_step_ms": []}
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(buffer)
        timings["all_reduce_ms"].append((time.perf_counter() - start) * 1e3)
    for mode in ("micro_batch", "global_batch"):
        model = new_model()
        if mode == "global_batch":
            load = use_global_batch_balance(model)
        for _ in range(repeats):
            if mode == "global_batch":
                load.new_step()
            dist.barrier()
            start = time.perf_counter()
            input_ids, mask = data[rank]
            out = model(input_ids=input_ids, attention_mask=mask, labels=input_ids, output_router_logits=True)
            out.loss.backward()
            dist.barrier()  # both modes timed to the slower rank (global mode waits for it in forward)
            timings[f"{mode}_step_ms"].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in timings.items()}


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert dist.get_world_size() == WORLD
    data = batches(tiny_config()["vocab_size"])
    report = {
        "dp": case_dp(rank, data),
        "dp_accumulation": case_dp_accumulation(rank, data),
        "ep": case_ep(rank, data),
        "cost": cost(rank, data),
    }
    if rank == 0:
        Path(out_path).write_text(json.dumps(report, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
