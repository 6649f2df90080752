"""The MoE block on one process: both expert backends against transformers' block, PEFT LoRA and
bitsandbytes 4-bit experts, the backend choice, expert capacity on hand-computed cases, the router
z-loss gradient, router statistics, and a smoke run of the micro-benchmark.
"""

import importlib.util
import math
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
import transformers
from mixtral_reference import tiny_config
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from mixtral_model import MixtralConfig, MixtralForCausalLM
from mixtral_model.moe import (
    SparseMoeBlock,
    choose_expert_backend,
    expert_backend_for,
    expert_capacity,
    plan_slots,
)
from mixtral_model.router_losses import load_balancing_loss
from mixtral_model.router_stats import router_statistics
from mixtral_model.testing import copy_experts_to_transformers, max_relative_diff, quantize_experts_nf4

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5


def block_config(**overrides) -> MixtralConfig:
    return MixtralConfig(**tiny_config(hidden_size=32, intermediate_size=48, **overrides))


def random_block(seed: int = 0, **overrides) -> SparseMoeBlock:
    torch.manual_seed(seed)
    block = SparseMoeBlock(block_config(**overrides))
    for p in block.parameters():
        nn.init.normal_(p, std=0.2)
    return block


def transformers_block(ours: SparseMoeBlock) -> MixtralSparseMoeBlock:
    config = transformers.MixtralConfig(**tiny_config(hidden_size=32, intermediate_size=48))
    config._experts_implementation = "eager"
    theirs = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        theirs.gate.weight.copy_(ours.gate.weight)
    copy_experts_to_transformers(ours.experts, theirs.experts)
    return theirs


def forward_backward(block, x_BTD, upstream_BTD):
    x_BTD = x_BTD.detach().requires_grad_()
    out = block(x_BTD)
    out_BTD = out[0] if isinstance(out, tuple) else out
    (out_BTD * upstream_BTD).sum().backward()
    return out_BTD.detach(), x_BTD.grad


def inputs(shape=(2, 9, 32), seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


@pytest.mark.parametrize("backend", ["per_expert", "grouped_loop"])
def test_block_matches_transformers(backend):
    ours = random_block()
    ours.expert_backend = backend
    theirs = transformers_block(ours)
    x, upstream = inputs()
    out, x_grad = forward_backward(ours, x, upstream)
    ref_out, ref_x_grad = forward_backward(theirs, x, upstream)
    assert max_relative_diff(out, ref_out) <= TOL
    assert max_relative_diff(x_grad, ref_x_grad) <= TOL
    assert max_relative_diff(ours.gate.weight.grad, theirs.gate.weight.grad) <= TOL
    for e, expert in ours.experts.items():
        gate_up = theirs.experts.gate_up_proj.grad[int(e)]
        assert max_relative_diff(expert.w1.weight.grad, gate_up[:48]) <= TOL
        assert max_relative_diff(expert.w3.weight.grad, gate_up[48:]) <= TOL
        assert max_relative_diff(expert.w2.weight.grad, theirs.experts.down_proj.grad[int(e)]) <= TOL


@pytest.mark.parametrize("backend", ["grouped_loop"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_grouped_backends_equal_per_expert(backend, dtype, tol):
    """Same numbers (and gradients) as the general path, with an expert that receives no token."""
    results = {}
    for name in ("per_expert", backend):
        block = random_block().to(dtype)
        with torch.no_grad():
            block.gate.weight[3] = -10.0 * block.gate.weight[:3].abs().sum(
                0
            )  # expert 3: large negative logits
        block.expert_backend = name
        x, upstream = inputs(dtype=dtype)
        x = x.abs()  # so expert 3's logit stays the smallest
        out, x_grad = forward_backward(block, x, upstream)
        grads = {param_name: p.grad.float() for param_name, p in block.named_parameters()}
        results[name] = out.float(), x_grad.float(), grads
    (out_a, xg_a, grads_a), (out_b, xg_b, grads_b) = results["per_expert"], results[backend]
    assert grads_a["experts.3.w1.weight"].abs().max() == 0  # no token reached expert 3
    assert max_relative_diff(out_b, out_a) <= tol
    assert max_relative_diff(xg_b, xg_a) <= tol
    for name in grads_a:
        assert max_relative_diff(grads_b[name], grads_a[name]) <= tol, name


def facts(**overrides) -> dict:
    """Readable, unpartitioned experts on a GPU, with overrides."""
    return dict(readable=True, partitioned=False, device_type="cuda") | overrides


CPU = dict(device_type="cpu")


@pytest.mark.parametrize(
    "facts, expected",
    [
        (facts(), "per_expert"),  # CUDA: per_expert until a GPU measurement chooses the expert loop
        (facts(readable=False), "per_expert"),  # merged/disabled/several adapters, DoRA, hooks
        (facts(partitioned=True), "per_expert"),  # ZeRO-3 outside the gathered leaf block
        (facts(**CPU), "grouped_loop"),  # the expert loop: per_expert's numbers, less memory
        (facts(**CPU, readable=False), "per_expert"),
        (facts(**CPU, partitioned=True), "per_expert"),
    ],
)
def test_choose_expert_backend(facts, expected):
    assert choose_expert_backend(**facts) == expected


def dequantized_copy(block: SparseMoeBlock) -> SparseMoeBlock:
    plain = random_block()
    plain.load_state_dict(
        {k: v for k, v in block.state_dict().items() if k.startswith("gate.")}, strict=False
    )
    with torch.no_grad():
        for e, expert in block.experts.items():
            for name in ("w1", "w2", "w3"):
                weight = getattr(expert, name).weight
                dequantized = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
                getattr(plain.experts[e], name).weight.copy_(dequantized)
    return plain


def test_bitsandbytes_4bit_experts():
    """per_expert on bitsandbytes NF4 experts computes with bitsandbytes' dequantized weights (the
    expert loop, `auto` on CPU, is held to per_expert in test_expert_backends)."""
    block = random_block()
    quantize_experts_nf4(block)
    assert expert_backend_for(list(block.experts.values())) == "grouped_loop"
    block.expert_backend = "per_expert"
    reference = dequantized_copy(block)
    x, upstream = inputs()
    out, x_grad = forward_backward(block, x, upstream)
    ref_out, ref_x_grad = forward_backward(reference, x, upstream)
    assert max_relative_diff(out, ref_out) <= 1e-5
    assert max_relative_diff(x_grad, ref_x_grad) <= 1e-5


def test_peft_lora_on_experts():
    """LoRA-wrapped experts train; the wrapped model equals the merged one."""
    lora = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["w1", "w2", "w3"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    input_ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    out = lora(input_ids=input_ids, labels=input_ids, output_router_logits=True)
    out.loss.backward()
    lora_grads = [p.grad for n, p in lora.named_parameters() if "lora_" in n and ".experts." in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)
    merged = lora.merge_and_unload()
    with torch.no_grad():
        assert max_relative_diff(out.logits.detach(), merged(input_ids).logits) <= TOL


def identity_routed_block(num_experts: int, top_k: int, capacity_factor):
    """A block whose router logits are the first num_experts input coordinates."""
    block = random_block(
        num_local_experts=num_experts, num_experts_per_tok=top_k, expert_capacity_factor=capacity_factor
    )
    with torch.no_grad():
        block.gate.weight.zero_()
        block.gate.weight[:, :num_experts] = torch.eye(num_experts)
    return block


def rows_choosing(choices: list[tuple[int, ...]], num_experts: int, hidden: int = 32) -> torch.Tensor:
    """One token per entry, preferring the listed experts in order (logits 3, 2, ...; the rest -5)."""
    x_ND = torch.randn(len(choices), hidden, generator=torch.Generator().manual_seed(5))
    x_ND[:, :num_experts] = -5.0
    for n, chosen in enumerate(choices):
        for rank, e in enumerate(chosen):
            x_ND[n, e] = 3.0 - rank
    return x_ND


def expected_output(block, x_ND, kept: list[list[int]]) -> torch.Tensor:
    """Hand-computed output: each token sums its kept experts' outputs times its renormalised top-k weight."""
    logits_NE = x_ND[:, : block.num_experts]
    weights_NE = torch.softmax(logits_NE, dim=-1)
    out = torch.zeros_like(x_ND)
    for n, experts in enumerate(kept):
        top = torch.topk(weights_NE[n], block.top_k).values.sum()
        for e in experts:
            out[n] += weights_NE[n, e] / top * block.experts[str(e)](x_ND[n : n + 1])[0]
    return out


def test_capacity_top1_drops_later_tokens():
    """E=2, top-1, 6 tokens, factor 1.0: capacity ceil(1.0 * 6 * 1 / 2) = 3; expert 0 is chosen by
    tokens 0, 1, 2, 3, 5 and keeps the first three; tokens 3 and 5 are dropped (output 0)."""
    block = identity_routed_block(num_experts=2, top_k=1, capacity_factor=1.0)
    x_ND = rows_choosing([(0,), (0,), (0,), (0,), (1,), (0,)], num_experts=2)
    assert block.capacity(6) == 3
    with torch.no_grad():
        out = block(x_ND[None])[0][0]
        expected = expected_output(block, x_ND, kept=[[0], [0], [0], [], [1], []])
    torch.testing.assert_close(out, expected)
    assert out[3].abs().max() == 0 and out[5].abs().max() == 0


def test_capacity_top2_keeps_token_order_within_each_expert():
    """E=4, top-2, 4 tokens, factor 0.5: capacity ceil(0.5 * 4 * 2 / 4) = 1 per expert.
    Token 0 -> (0, 1) keeps both; token 1 -> (0, 2): 0 is full, keeps 2; token 2 -> (1, 3): 1 is
    full, keeps 3; token 3 -> (2, 3): both full, dropped entirely."""
    block = identity_routed_block(num_experts=4, top_k=2, capacity_factor=0.5)
    x_ND = rows_choosing([(0, 1), (0, 2), (1, 3), (2, 3)], num_experts=4)
    experts_NK = torch.tensor([[0, 1], [0, 2], [1, 3], [2, 3]])
    plan = plan_slots(experts_NK, 4, capacity=1)
    assert plan.slot_order_M.tolist() == [0, 1, 3, 5]  # slots (token 0, k 0), (0, 1), (1, 1), (2, 1)
    assert plan.tokens_per_expert_E.tolist() == [1, 1, 1, 1]
    with torch.no_grad():
        out = block(x_ND[None])[0][0]
        expected = expected_output(block, x_ND, kept=[[0, 1], [2], [3], []])
    torch.testing.assert_close(out, expected)


def test_capacity_formula_and_large_factor_is_dropless():
    assert expert_capacity(num_tokens=10, top_k=2, num_experts=8, capacity_factor=1.25) == math.ceil(3.125)
    dropless, roomy = random_block(), random_block(expert_capacity_factor=8.0)
    x, _ = inputs()
    with torch.no_grad():
        torch.testing.assert_close(dropless(x)[0], roomy(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("factor", [0, -1.0, "1.0"])
def test_capacity_factor_must_be_positive(factor):
    with pytest.raises(ValueError, match="expert_capacity_factor=.* must be a positive number"):
        MixtralConfig(**tiny_config(expert_capacity_factor=factor))


def tiny_model(**overrides) -> MixtralForCausalLM:
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(**tiny_config(**overrides)))


def test_z_loss_gradient_reaches_router():
    """d(loss)/d(router) with z-loss = without + router_z_loss_coef * d(z_loss)/d(router)."""
    input_ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    grads = {}
    for coef in (0.0, 0.05):
        ours = tiny_model(router_z_loss_coef=coef)
        out = ours(input_ids=input_ids, labels=input_ids, output_router_logits=True)
        out.loss.backward()
        grads[coef] = ours.model.layers[0].block_sparse_moe.gate.weight.grad.clone()
        if coef:
            assert out.z_loss is not None and out.z_loss > 0
            ours.zero_grad()
            out = ours(input_ids=input_ids, labels=input_ids, output_router_logits=True)
            out.z_loss.backward()
            z_grad = ours.model.layers[0].block_sparse_moe.gate.weight.grad
    torch.testing.assert_close(grads[0.05] - grads[0.0], 0.05 * z_grad, rtol=1e-4, atol=1e-7)


def test_router_statistics_from_model_output():
    ours = tiny_model(router_z_loss_coef=0.01)
    input_ids = torch.randint(0, 97, (3, 8), generator=torch.Generator().manual_seed(3))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    with torch.no_grad():
        out = ours(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True)
    stats = router_statistics(out.router_logits, ours.config.num_experts_per_tok, attention_mask)
    assert all(isinstance(v, float) for v in stats.values())
    for layer in range(2):
        fractions = [stats[f"router/layer_{layer}/expert_{e}_fraction"] for e in range(4)]
        assert math.isclose(sum(fractions), 1.0, rel_tol=1e-6)
        layer_aux = load_balancing_loss((out.router_logits[layer],), 4, 2, attention_mask)
        assert math.isclose(stats[f"router/layer_{layer}/aux_loss"], layer_aux.item(), rel_tol=1e-5)
        assert 0 < stats[f"router/layer_{layer}/entropy"] <= math.log(4)
    assert math.isclose(stats["router/aux_loss"], out.aux_loss.item(), rel_tol=1e-5)
    assert math.isclose(stats["router/z_loss"], out.z_loss.item(), rel_tol=1e-5)
    busiest = max(stats[f"router/layer_{layer}/expert_{e}_fraction"] for layer in range(2) for e in range(4))
    assert math.isclose(stats["router/max_expert_load"], busiest * 4, rel_tol=1e-6)
    assert "router/dropped_fraction" not in stats


def test_router_statistics_hand_case():
    """Uniform logits: entropy log(E); 3 real tokens all routed to (0, 1); capacity 1 drops 2 of 3."""
    logits_NE = torch.tensor([[5.0, 4.0, 0.0, 0.0]] * 3 + [[0.0, 0.0, 5.0, 4.0]])  # last token is padding
    mask = torch.tensor([[1, 1, 1, 0]])
    stats = router_statistics(
        (logits_NE, torch.zeros(4, 4)), top_k=2, attention_mask_BT=mask, capacity_factor=0.5
    )
    assert stats["router/layer_0/expert_0_fraction"] == pytest.approx(0.5)
    assert stats["router/layer_0/expert_2_fraction"] == 0.0
    assert stats["router/layer_1/entropy"] == pytest.approx(math.log(4))
    assert stats["router/layer_1/z_loss"] == pytest.approx(math.log(4) ** 2)
    # capacity ceil(0.5 * 4 * 2 / 4) = 1: token 0 keeps both slots, tokens 1 and 2 lose both.
    assert stats["router/layer_0/dropped_fraction"] == pytest.approx(4 / 6)
    assert stats["router/max_expert_load"] == pytest.approx(2.0)


def test_bench_quick_smoke(capsys):
    spec = importlib.util.spec_from_file_location("moe_block_bench", REPO / "bench" / "moe_block.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    (fp32,) = bench.main(["--quick", "--repeats", "1", "--dtypes", "fp32"]).values()
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "speed ratio" in printed
    # fp32: both routers pick the same experts for every token, and every implementation (ours, and
    # transformers' default experts backend) gives transformers' eager loop's output to fp32 rounding
    assert fp32["routed_alike"] == fp32["tokens"] == bench.QUICK["tokens"]
    assert len(fp32["max_rel_diff"]) == 3 and all(d <= 1e-5 for d in fp32["max_rel_diff"].values()), fp32
    assert all(v > 0 for v in fp32["tokens_per_s"].values()) and len(fp32["speed_ratio"]) == 2
    assert all(0 < r < float("inf") for r in fp32["speed_ratio"].values())
