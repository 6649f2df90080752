"""Forward + backward throughput of our SparseMoeBlock against transformers' MixtralSparseMoeBlock.

    python bench/moe_block.py            # hidden 1024, intermediate 3584, 8 experts, top-2, 2048 tokens
    python bench/moe_block.py --quick    # small smoke run

Steps: build both blocks on the same weights (transformers' fused `gate_up_proj`/`down_proj` filled from
our `w1`/`w3`/`w2`), check that their outputs agree, then time forward + backward of every
implementation round-robin (so machine noise hits all of them alike) for fp32 and bf16. Prints
tokens/s (median over rounds) and the median over rounds of the per-round speed ratios.
Implementations: ours (its automatic expert backend), transformers' default experts backend (what `from_pretrained` picks on this
machine: `grouped_mm` where `torch._grouped_mm` runs) and transformers' `eager` loop. CUDA when
present, else CPU.
"""

import argparse
import copy
import statistics
import time

import torch
import transformers
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from mixtral_model import MixtralConfig
from mixtral_model.moe import SparseMoeBlock, expert_backend_for
from mixtral_model.testing import copy_experts_to_transformers, max_relative_diff

FULL = dict(hidden_size=1024, intermediate_size=3584, num_local_experts=8, num_experts_per_tok=2, tokens=2048)
QUICK = dict(hidden_size=128, intermediate_size=256, num_local_experts=8, num_experts_per_tok=2, tokens=256)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def transformers_default_experts_implementation(shape: dict) -> str:
    """The experts backend transformers selects when a model is built without asking for one."""
    tiny = transformers.MixtralConfig(**block_config_kwargs(shape), num_hidden_layers=1, vocab_size=8)
    return transformers.MixtralForCausalLM(tiny).config._experts_implementation


def block_config_kwargs(shape: dict) -> dict:
    return {k: v for k, v in shape.items() if k != "tokens"}


def build_blocks(shape: dict, dtype: torch.dtype, device: torch.device):
    """Our block with random weights, and transformers' block holding the same weights."""
    torch.manual_seed(0)
    ours = SparseMoeBlock(MixtralConfig(**block_config_kwargs(shape)))
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.02)
    theirs = MixtralSparseMoeBlock(transformers.MixtralConfig(**block_config_kwargs(shape)))
    with torch.no_grad():
        theirs.gate.weight.copy_(ours.gate.weight)
    copy_experts_to_transformers(ours.experts, theirs.experts)
    return ours.to(device, dtype), theirs.to(device, dtype)


def use_experts_backend(block: MixtralSparseMoeBlock, name: str) -> None:
    block.experts.config = copy.copy(block.experts.config)
    block.experts.config._experts_implementation = name


def forward_backward(block, x_BTD: torch.Tensor, grad_BTD: torch.Tensor) -> torch.Tensor:
    block.zero_grad(set_to_none=True)
    x_BTD = x_BTD.detach().requires_grad_()
    out = block(x_BTD)
    out_BTD = out[0] if isinstance(out, tuple) else out
    out_BTD.backward(grad_BTD)
    return out_BTD.detach()


def routed_alike(ours: SparseMoeBlock, theirs: MixtralSparseMoeBlock, x_TD: torch.Tensor) -> torch.Tensor:
    """(T,) bool: tokens whose top-k expert set is the same under both routers."""
    with torch.no_grad():
        ours_TK = torch.topk(ours.gate(x_TD), ours.top_k).indices.sort(-1).values
        theirs_TK = torch.topk(theirs.gate(x_TD)[0].float(), ours.top_k).indices.sort(-1).values
    return (ours_TK == theirs_TK).all(-1)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def bench_dtype(
    shape: dict, dtype_name: str, repeats: int, device: torch.device, default_backend: str
) -> dict:
    """Prints and returns: tokens routed alike by both routers, each implementation's max relative
    output difference vs transformers' eager loop on them, tokens/s, and ours' median speed ratios."""
    dtype = DTYPES[dtype_name]
    ours, theirs_default = build_blocks(shape, dtype, device)
    theirs_eager = copy.deepcopy(theirs_default)
    use_experts_backend(theirs_default, default_backend)
    use_experts_backend(theirs_eager, "eager")
    ours_name = f"ours[{expert_backend_for(list(ours.experts.values()))}]"
    impls = {
        ours_name: ours,
        f"transformers[{default_backend}]": theirs_default,
        "transformers[eager]": theirs_eager,
    }
    g = torch.Generator().manual_seed(1)
    x_BTD = torch.randn(1, shape["tokens"], shape["hidden_size"], generator=g).to(device, dtype)
    grad_BTD = torch.randn(x_BTD.shape, generator=g).to(device, dtype)

    outputs = {name: forward_backward(block, x_BTD, grad_BTD) for name, block in impls.items()}  # warm-up
    alike_T = routed_alike(ours, theirs_default, x_BTD[0])
    reference = outputs["transformers[eager]"][0, alike_T]
    print(
        f"  [{dtype_name}] {int(alike_T.sum())} of {alike_T.numel()} tokens pick the same experts in both "
        "routers (ours computes router logits in fp32, transformers in the input dtype)"
    )
    result = {"tokens": alike_T.numel(), "routed_alike": int(alike_T.sum()), "max_rel_diff": {},
              "tokens_per_s": {}, "speed_ratio": {}}  # fmt: skip
    for name, out in outputs.items():
        diff = max_relative_diff(out[0, alike_T], reference)
        result["max_rel_diff"][name] = diff
        print(f"  [{dtype_name}] {name:28s} output max rel diff vs eager on those tokens: {diff:.2e}")

    seconds = {name: [] for name in impls}
    for _ in range(repeats):
        for name, block in impls.items():
            seconds[name].append(timed(lambda b=block: forward_backward(b, x_BTD, grad_BTD), device))
    for name in impls:
        tokens_per_s = shape["tokens"] / statistics.median(seconds[name])
        result["tokens_per_s"][name] = tokens_per_s
        print(f"  [{dtype_name}] {name:28s} {tokens_per_s:10.0f} tokens/s (fwd+bwd, median of {repeats})")
    for name in list(impls)[1:]:
        ratios = [theirs / ours_s for ours_s, theirs in zip(seconds[ours_name], seconds[name], strict=True)]
        result["speed_ratio"][name] = statistics.median(ratios)
        print(f"  [{dtype_name}] ours / {name:21s} speed ratio {statistics.median(ratios):.2f}x (median)")
    return result


def main(argv=None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and 2 rounds: a smoke run")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed rounds per dtype (default 5, quick 2)"
    )
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--tokens", type=int, default=None, help="override the number of tokens")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--hidden-size", type=int, default=None, help="override the hidden size")
    parser.add_argument("--intermediate-size", type=int, default=None, help="override the expert width")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    shape = dict(QUICK if args.quick else FULL)
    for key in ("tokens", "hidden_size", "intermediate_size"):
        if getattr(args, key):
            shape[key] = getattr(args, key)
    repeats = args.repeats or (2 if args.quick else 5)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    default_backend = transformers_default_experts_implementation(shape)
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu, {torch.get_num_threads()} threads"
    )
    print(
        f"MoE block fwd+bwd on {where}; torch {torch.__version__}, transformers {transformers.__version__}; {shape}"
    )
    return {
        dtype_name: bench_dtype(shape, dtype_name, repeats, device, default_backend)
        for dtype_name in args.dtypes
    }


if __name__ == "__main__":
    main()
