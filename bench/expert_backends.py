"""Our expert backends against `per_expert` on one MoE block with LoRA r=16 (or QLoRA: NF4 experts +
LoRA), forward + backward, timed round-robin in one process.

    python bench/expert_backends.py --threads 1                 # LoRA and QLoRA, bf16 and fp32
    python bench/expert_backends.py --kinds qlora --dtypes bf16 --rounds 9
    python bench/expert_backends.py --kinds lora32 qlora32 --dtypes bf16   # PEFT's default fp32 adapters
    OMP_NUM_THREADS=1 python bench/expert_backends.py --threads 1 --clock cpu   # on a shared machine

`--clock cpu` times by process CPU time (see bench/train_step.py). On a GPU, at Mixtral-8x7B's expert
shapes (wall clock, synchronized):

    python bench/expert_backends.py --device cuda --hidden 4096 --intermediate 14336 --tokens 4096 --dtypes bf16 --rounds 5

Block: hidden 512, intermediate 1792, 8 experts top-2, 2048 tokens (the layers of bench/train_step.py).
Printed per backend: median seconds and the median over rounds of per_expert's time / this one's
(> 1: faster than per_expert), after one warm-up round, and the bytes one forward keeps for backward
(saved tensors' distinct storages, parameters and the input excluded).
"""

import argparse
import statistics
import subprocess
import time
import warnings

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from mixtral_model import MixtralConfig
from mixtral_model.moe import SparseMoeBlock
from mixtral_model.testing import quantize_experts_nf4

SHAPE = dict(hidden_size=512, intermediate_size=1792, num_local_experts=8, num_experts_per_tok=2, tokens=2048)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
BACKENDS = ("per_expert", "grouped_loop")
KINDS = (
    "lora",
    "qlora",
    "lora32",
    "qlora32",
)  # *32: adapters in fp32 (PEFT's default), else the block's dtype


class Holder(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x)[0]


def build(kind: str, dtype: torch.dtype, backend: str, shape: dict, device: str) -> nn.Module:
    torch.manual_seed(0)
    config = MixtralConfig(
        **{k: v for k, v in shape.items() if k != "tokens"},
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=128,
    )
    block = SparseMoeBlock(config).to(device)
    for p in block.parameters():
        nn.init.normal_(p, std=0.02)
    block.to(dtype)
    if kind.startswith("qlora"):
        quantize_experts_nf4(block, dtype, device)
    model = get_peft_model(Holder(block), LoraConfig(r=16, lora_alpha=32, target_modules=["w1", "w2", "w3"]))
    for name, p in model.named_parameters():
        if "lora_" in name:  # lora32: PEFT's default fp32 adapters over the block's dtype
            p.data = p.data.to(device, torch.float32 if kind.endswith("32") else dtype)
    block.expert_backend = backend
    return model


def saved_for_backward(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages one forward keeps for backward, beyond parameters and the input."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}
    return sum(n for ptr, n in storages.items() if ptr not in skip)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", nargs="+", default=["lora", "qlora"], choices=KINDS)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds after one warm-up")
    parser.add_argument("--tokens", type=int, default=SHAPE["tokens"])
    parser.add_argument("--hidden", type=int, default=SHAPE["hidden_size"])
    parser.add_argument("--intermediate", type=int, default=SHAPE["intermediate_size"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = dict(SHAPE, hidden_size=args.hidden, intermediate_size=args.intermediate, tokens=args.tokens)
    cuda = args.device.startswith("cuda")
    if cuda and args.clock == "cpu":
        parser.error("--clock cpu measures the host, not the GPU: use the wall clock with --device cuda")
    measure = time.process_time if args.clock == "cpu" else time.perf_counter

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize()
        return measure()

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if line.startswith("Model name")
        ),
        "unknown CPU",
    )
    print(
        f"{torch.cuda.get_device_name() if cuda else cpu}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}; block {shape}; {args.clock} clock"
    )
    print(
        "| block | backend | median s | per_expert / this (median of rounds) | rounds | kept for backward, MiB |"
    )
    print("|---|---|---|---|---|---|")
    for kind in args.kinds:
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            models = {backend: build(kind, dtype, backend, shape, args.device) for backend in BACKENDS}
            x = torch.randn(
                1, args.tokens, shape["hidden_size"], generator=torch.Generator().manual_seed(1)
            ).to(args.device, dtype)
            x.requires_grad_()
            seconds = {backend: [] for backend in BACKENDS}
            for _ in range(args.rounds + 1):
                for backend, model in models.items():
                    start = clock()
                    model(x).float().square().mean().backward()
                    seconds[backend].append(clock() - start)
            for backend in BACKENDS:
                ratios = [a / b for a, b in zip(seconds["per_expert"][1:], seconds[backend][1:], strict=True)]
                print(
                    f"| {kind} {dtype_name} | {backend} | {statistics.median(seconds[backend][1:]):.3f} | "
                    f"{statistics.median(ratios):.2f}x | {' '.join(f'{r:.2f}' for r in ratios)} | "
                    f"{saved_for_backward(models[backend], x) / 2**20:.1f} |",
                    flush=True,
                )
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
