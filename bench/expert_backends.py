"""Our expert backends against `per_expert` on one MoE block with LoRA r=16 (or QLoRA: NF4 experts +
LoRA), forward + backward, timed round-robin in one process.

    python bench/expert_backends.py --threads 1                 # LoRA and QLoRA, bf16 and fp32
    python bench/expert_backends.py --kinds qlora --dtypes bf16 --rounds 9
    OMP_NUM_THREADS=1 python bench/expert_backends.py --threads 1 --clock cpu   # on a shared machine

`--clock cpu` times by process CPU time (see bench/train_step.py).

Block: hidden 512, intermediate 1792, 8 experts top-2, 2048 tokens (the layers of bench/train_step.py).
Printed per backend: median seconds and the median over rounds of per_expert's time / this one's
(> 1: faster than per_expert), after one warm-up round.
"""

import argparse
import statistics
import subprocess
import time
import warnings

import bitsandbytes as bnb
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from mixtral_model import MixtralConfig
from mixtral_model.moe import SparseMoeBlock

SHAPE = dict(hidden_size=512, intermediate_size=1792, num_local_experts=8, num_experts_per_tok=2, tokens=2048)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
BACKENDS = ("per_expert", "grouped_loop", "grouped_mm")


class Holder(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x)[0]


def quantize(block: SparseMoeBlock, dtype: torch.dtype) -> None:
    for expert in block.experts.values():
        for name in ("w1", "w2", "w3"):
            linear = getattr(expert, name)
            layer = bnb.nn.Linear4bit(
                linear.in_features, linear.out_features, bias=False, compute_dtype=dtype, quant_type="nf4"
            )
            layer.weight = bnb.nn.Params4bit(
                linear.weight.data.clone(), requires_grad=False, quant_type="nf4"
            )
            setattr(expert, name, layer.to("cpu"))


def build(kind: str, dtype: torch.dtype, backend: str) -> nn.Module:
    torch.manual_seed(0)
    config = MixtralConfig(
        **{k: v for k, v in SHAPE.items() if k != "tokens"},
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=128,
    )
    block = SparseMoeBlock(config)
    for p in block.parameters():
        nn.init.normal_(p, std=0.02)
    block.to(dtype)
    if kind == "qlora":
        quantize(block, dtype)
    model = get_peft_model(Holder(block), LoraConfig(r=16, lora_alpha=32, target_modules=["w1", "w2", "w3"]))
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(dtype)
    block.expert_backend = backend
    return model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", nargs="+", default=["lora", "qlora"], choices=["lora", "qlora"])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds after one warm-up")
    parser.add_argument("--tokens", type=int, default=SHAPE["tokens"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if line.startswith("Model name")
        ),
        "unknown CPU",
    )
    print(
        f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; block {SHAPE}, "
        f"tokens {args.tokens}; {args.clock} clock"
    )
    print("| block | backend | median s | per_expert / this (median of rounds) | rounds |")
    print("|---|---|---|---|---|")
    for kind in args.kinds:
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            models = {backend: build(kind, dtype, backend) for backend in BACKENDS}
            x = torch.randn(
                1, args.tokens, SHAPE["hidden_size"], generator=torch.Generator().manual_seed(1)
            ).to(dtype)
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
                    f"{statistics.median(ratios):.2f}x | {' '.join(f'{r:.2f}' for r in ratios)} |",
                    flush=True,
                )
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
