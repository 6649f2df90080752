"""Helpers the tests and the benchmarks share (as transformers ships `testing_utils`): the relative
difference every comparison reports, our experts' weights in transformers' fused expert layout, and
experts quantized to bitsandbytes NF4."""

import torch


def max_relative_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64 (the max difference itself when `expected`
    is all zero)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    return diff / scale if scale > 0 else diff


@torch.no_grad()
def copy_experts_to_transformers(experts, theirs) -> None:
    """Our experts (`experts.E.w1/w2/w3`, keyed by global index) into transformers' fused
    `MixtralExperts` (`theirs`): gate_up_proj[E] = [w1; w3], down_proj[E] = w2."""
    for e, expert in experts.items():
        theirs.gate_up_proj[int(e)].copy_(torch.cat([expert.w1.weight, expert.w3.weight]))
        theirs.down_proj[int(e)].copy_(expert.w2.weight)


def quantize_experts_nf4(block, compute_dtype: torch.dtype = torch.float32, device="cpu") -> None:
    """Replace every expert projection of a SparseMoeBlock by a bitsandbytes NF4 `Linear4bit` holding the
    same weight, quantized on `device`."""
    import bitsandbytes as bnb

    for expert in block.experts.values():
        for name in ("w1", "w2", "w3"):
            linear = getattr(expert, name)
            quantized = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=False,
                compute_dtype=compute_dtype,
                quant_type="nf4",
            )
            quantized.weight = bnb.nn.Params4bit(
                linear.weight.data.clone(), requires_grad=False, quant_type="nf4"
            )
            setattr(expert, name, quantized.to(device))
