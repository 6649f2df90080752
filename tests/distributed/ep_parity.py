"""Expert parallelism on 2 gloo ranks against a single-process reference on the same weights and data.

    torchrun --nproc_per_node 2 tests/distributed/ep_parity.py OUT.json

Every rank builds the reference (all experts, one device) and a copy of it made expert-parallel by
`parallelize_experts` (its half of the experts), runs its own batch through the EP one and compares:
outputs and loss of its batch; a dense parameter's grad with the reference grad of this rank's loss;
an expert's grad on its owner with the reference grad of the SUM of both ranks' losses. Rank 0
writes {case: {rank: {quantity: max relative diff}}} plus the rows each rank sent and received.
Launched by tests/test_expert_parallel.py.
"""

import copy
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2])]

from mixtral_reference import max_relative_diff, tiny_config  # noqa: E402

from mixtral_model import MixtralConfig, MixtralForCausalLM  # noqa: E402
from mixtral_model.moe import SparseMoeBlock, expert_capacity, plan_slots, route_top_k  # noqa: E402
from mixtral_parallel import expert_parallel as parallel  # noqa: E402
from mixtral_parallel.expert_parallel import is_expert_param, new_expert_parallel_groups, parallelize_experts  # noqa: E402

WORLD = 2


def parallelized_copy(reference: torch.nn.Module, groups) -> torch.nn.Module:
    """The reference as built on one device, then made expert-parallel (this rank's experts, same weights)."""
    model = parallelize_experts(copy.deepcopy(reference), groups)
    full = reference.state_dict()
    assert all(torch.equal(value, full[key]) for key, value in model.state_dict().items())
    return model


def reference_grads(reference, losses, rank) -> dict[str, torch.Tensor]:
    """Dense params: grad of this rank's loss. Expert params: grad of the sum of all ranks' losses."""
    names, params = zip(*reference.named_parameters(), strict=True)
    own = torch.autograd.grad(losses[rank], params, retain_graph=True, allow_unused=True)
    total = torch.autograd.grad(sum(losses), params, allow_unused=True)
    grads = {}
    for name, param, own_grad, total_grad in zip(names, params, own, total, strict=True):
        grad = total_grad if is_expert_param(name) else own_grad
        grads[name] = grad if grad is not None else torch.zeros_like(param)
    return grads


def grad_diffs(model, expected: dict[str, torch.Tensor]) -> dict[str, float]:
    dense, expert = 0.0, 0.0
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} has no grad"
        diff = max_relative_diff(param.grad, expected[name])
        if is_expert_param(name):
            expert = max(expert, diff)
        else:
            dense = max(dense, diff)
    return {"dense_grads": dense, "expert_grads": expert}


def routing_facts(router_logits_NE: torch.Tensor, top_k: int, capacity_factor=None) -> dict:
    """Rows per expert summed over the ranks, and the slots this rank dropped for capacity."""
    num_tokens, num_experts = router_logits_NE.shape
    _, experts_NK = route_top_k(router_logits_NE.detach(), top_k)
    capacity = (
        None if capacity_factor is None else expert_capacity(num_tokens, top_k, num_experts, capacity_factor)
    )
    plan = plan_slots(experts_NK, num_experts, capacity)
    tokens_per_expert_E = torch.bincount(experts_NK.reshape(-1), minlength=num_experts)
    dist.all_reduce(tokens_per_expert_E)
    dropped = num_tokens * top_k - plan.slot_order_M.numel()
    return {"global_tokens_per_expert": tokens_per_expert_E.tolist(), "dropped_slots": dropped}


@contextmanager
def counting_exchanges():
    """Counts the MoE blocks' token exchanges (dispatch + return all-to-alls) while active."""
    calls, original = [], parallel.exchange_with_expert_owners

    def counted(*args):
        calls.append(1)
        return original(*args)

    parallel.exchange_with_expert_owners = counted
    try:
        yield calls
    finally:
        parallel.exchange_with_expert_owners = original


def tiny_batch(rank: int, vocab: int, pad: bool):
    g = torch.Generator().manual_seed(100 + rank)
    seq = 9 + 3 * rank  # uneven token counts across ranks
    input_ids = torch.randint(0, vocab, (2, seq), generator=g)
    attention_mask = torch.ones_like(input_ids)
    if pad:
        attention_mask[1, : 2 + rank] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return input_ids, attention_mask, labels


def force_router_to_first_four(model) -> None:
    """Router rows +v, -v, +u, -u for experts 0..3 and 0 for the rest: top-2 always picks one of {0, 1}
    and one of {2, 3}, so experts 4.. (all of rank 1's under EP=2 with 8 experts) get no token at all."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in model.model.layers:
            weight = layer.block_sparse_moe.gate.weight
            v, u = torch.randn(2, weight.shape[1], generator=g)
            weight.zero_()
            weight[0], weight[1], weight[2], weight[3] = v, -v, u, -u


def compare_model(
    rank: int, groups, overrides: dict, pad: bool, force_router: bool = False, checkpointing: bool = False
) -> dict:
    torch.manual_seed(0)
    reference = MixtralForCausalLM(MixtralConfig(**tiny_config(**overrides)))
    if force_router:
        force_router_to_first_four(reference)
    model = parallelized_copy(reference, groups)
    for m in (reference, model):
        m.config._attn_implementation = "eager"
    if checkpointing:  # the block's all-to-alls run again inside backward, on every rank alike
        model.gradient_checkpointing_enable()
        model.train()

    batches = [tiny_batch(r, reference.config.vocab_size, pad) for r in range(WORLD)]
    input_ids, attention_mask, labels = batches[rank]
    with counting_exchanges() as exchanges:
        out = model(
            input_ids=input_ids, attention_mask=attention_mask, labels=labels, output_router_logits=True
        )
        out.loss.backward()

    ref_outs = [
        reference(input_ids=i, attention_mask=a, labels=lab, output_router_logits=True)
        for i, a, lab in batches
    ]
    expected = reference_grads(reference, [o.loss for o in ref_outs], rank)
    real = attention_mask.bool()
    diffs = {
        "logits": max_relative_diff(out.logits[real].detach(), ref_outs[rank].logits[real].detach()),
        "loss": max_relative_diff(out.loss.detach(), ref_outs[rank].loss.detach()),
        "aux_loss": max_relative_diff(out.aux_loss.detach(), ref_outs[rank].aux_loss.detach()),
    }
    if out.z_loss is not None:
        diffs["z_loss"] = max_relative_diff(out.z_loss.detach(), ref_outs[rank].z_loss.detach())
    diffs.update(grad_diffs(model, expected))
    diffs["token_exchanges"] = len(exchanges)  # per layer: 1, or 2 when backward recomputes it
    return diffs | routing_facts(out.router_logits[0], model.config.num_experts_per_tok)


def block_config(**overrides) -> MixtralConfig:
    return MixtralConfig(
        **tiny_config(hidden_size=16, intermediate_size=24, num_attention_heads=2, num_key_value_heads=2),
        **overrides,
    )


def routed_rows(rank: int, choices_per_rank: list[list[tuple[int, int]]], hidden: int, num_experts: int):
    """Token rows whose first num_experts coordinates pick the given expert pairs under a router
    with weight [I | 0]: logit 3 for the first choice, 2 for the second, -5 elsewhere."""
    g = torch.Generator().manual_seed(200 + rank)
    choices = choices_per_rank[rank]
    x_ND = torch.randn(len(choices), hidden, generator=g)
    x_ND[:, :num_experts] = -5.0
    for n, (first, second) in enumerate(choices):
        x_ND[n, first], x_ND[n, second] = 3.0, 2.0
    return x_ND


def compare_block(
    rank: int,
    groups,
    inputs_per_rank: list[torch.Tensor],
    overrides: dict,
    identity_router: bool,
    dtype: torch.dtype = torch.float32,
) -> dict:
    torch.manual_seed(1)
    reference = SparseMoeBlock(block_config(**overrides))
    for p in reference.parameters():
        torch.nn.init.normal_(p, std=0.3)
    if identity_router:
        with torch.no_grad():
            reference.gate.weight.zero_()
            reference.gate.weight[:, : reference.num_experts] = torch.eye(reference.num_experts)
    block = parallelized_copy(reference, groups)
    reference.to(dtype), block.to(dtype)

    g = torch.Generator().manual_seed(300)
    inputs_per_rank = [x.to(dtype) for x in inputs_per_rank]
    upstream = [torch.randn(x.shape, generator=g).to(dtype) for x in inputs_per_rank]
    out_BTD, router_logits_NE = block(inputs_per_rank[rank][None])
    (out_BTD[0] * upstream[rank]).sum().backward()
    ref_outs = [reference(x[None])[0][0] for x in inputs_per_rank]
    losses = [(o * up).sum() for o, up in zip(ref_outs, upstream, strict=True)]
    # Named as inside the model (`block_sparse_moe.experts.E...`), so is_expert_param sees the experts.
    expected = reference_grads(torch.nn.ModuleDict({"block_sparse_moe": reference}), losses, rank)
    diffs = {"output": max_relative_diff(out_BTD[0].detach(), ref_outs[rank].detach())}
    diffs.update(grad_diffs(torch.nn.ModuleDict({"block_sparse_moe": block}), expected))
    return diffs | routing_facts(router_logits_NE, block.top_k, block.capacity_factor)


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert dist.get_world_size() == WORLD
    groups = new_expert_parallel_groups(WORLD)
    # Expert 3 gets no row at all; expert 1 none from rank 1; rank 0 sends no row to rank 1.
    skewed_choices = [[(0, 1)] * 5, [(0, 2)] * 3]
    hidden, experts = 16, 4
    skewed = [routed_rows(r, skewed_choices, hidden, experts) for r in range(WORLD)]
    random_uneven = [
        torch.randn(7 + 5 * r, hidden, generator=torch.Generator().manual_seed(r)) for r in range(WORLD)
    ]
    results = {
        "model_padded": compare_model(rank, groups, {}, pad=True),
        "model_z_loss_top1": compare_model(
            rank, groups, dict(router_z_loss_coef=0.01, num_experts_per_tok=1), pad=True
        ),
        "model_rank1_experts_unused": compare_model(
            rank, groups, dict(num_local_experts=8), pad=False, force_router=True
        ),
        "model_gradient_checkpointing": compare_model(rank, groups, {}, pad=True, checkpointing=True),
        "block_skewed_routing": compare_block(rank, groups, skewed, {}, identity_router=True),
        "block_bf16": compare_block(
            rank, groups, random_uneven, {}, identity_router=False, dtype=torch.bfloat16
        ),
        "block_capacity_uneven_tokens": compare_block(
            rank, groups, random_uneven, dict(expert_capacity_factor=0.6), identity_router=False
        ),
    }
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, results)
    if rank == 0:
        report = {case: {str(r): gathered[r][case] for r in range(WORLD)} for case in results}
        Path(out_path).write_text(json.dumps(report, indent=1))
    dist.barrier()  # every rank done with gloo before any tears it down
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
