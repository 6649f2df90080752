"""Whole-model training step (forward + backward) of our Mixtral against transformers' on the same weights.

    python bench/train_step.py                      # every scenario, 4 layers, hidden 512, 8 experts, batch 4x512
    python bench/train_step.py --scenarios lora_fp32 lora_bf16 --repeats 5
    python bench/train_step.py --quick              # tiny shapes, 1 round: a smoke run
    OMP_NUM_THREADS=1 python bench/train_step.py --threads 1 --clock cpu --repeats 5   # on a shared machine

`--clock cpu` times each step by this process's CPU time (`time.process_time`) instead of wall time:
with one thread on a machine shared by more runnable threads than cores, wall time counts the waits
for a core and CPU time does not (it still counts cache and memory-bandwidth contention).

Scenarios (each one's implementations timed round-robin in this one process, so machine noise hits
them alike; printed: median seconds per step and the median over rounds of each per-round ratio, and
per step the medians of user and system CPU time and of minor page faults (getrusage): system time
rises with the page faults of large new tensors, since torch's CPU allocator keeps no cache and glibc
maps such blocks anew on each allocation and unmaps them when they are freed):

    lora_{fp32,bf16}   LoRA r=16 on attention (q, k, v, o) and experts: ours (automatic expert backend),
                       ours with `per_expert`, transformers' MixtralForCausalLM under PEFT (LoRA on its
                       fused 3-D experts through `target_parameters`).
    qlora_{bf16,fp32}  NF4 experts and attention (bitsandbytes, compute dtype as named) with LoRA r=16 on
                       attention and experts: ours automatic against ours `per_expert`.
    full_{bf16,fp32}   every parameter trained: ours (automatic) against transformers' default.
    ckpt_bf16          the lora_bf16 step of ours with activation checkpointing on every layer (the
                       recipes' setting), on every 2nd layer (transformers' `every_n_layers=2`) and off.
    parts_{bf16,fp32}  where a full step's time goes: all MoE blocks (ours, transformers') and the output
                       head + loss, each forward + backward alone at the step's shapes.

A step is `model(input_ids, labels, output_router_logits=True).loss.backward()` (router aux loss on,
no optimizer step: the same for both). Our weights are saved once in the hub layout and transformers
loads them, so both compute on identical weights; the first step's losses are printed as a check.
"""

import argparse
import resource
import statistics
import subprocess
import tempfile
import time
import warnings

import peft
import torch
import transformers

from mixtral_model import MixtralConfig, MixtralForCausalLM
from mixtral_model.model import causal_lm_loss
from mixtral_model.moe import SparseMoeBlock, expert_backend_for

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter
FULL = dict(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1792,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    batch=4,
    seq=512,
)
QUICK = dict(
    FULL, vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, batch=2, seq=32
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SCENARIOS = (
    "lora_fp32",
    "lora_bf16",
    "qlora_bf16",
    "qlora_fp32",
    "full_bf16",
    "full_fp32",
    "parts_bf16",
    "parts_fp32",
    "ckpt_bf16",
)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def model_kwargs(shape: dict) -> dict:
    return {k: v for k, v in shape.items() if k not in ("batch", "seq")}


def save_random_init(shape: dict, directory: str) -> None:
    torch.manual_seed(0)
    MixtralForCausalLM(MixtralConfig(**model_kwargs(shape), router_aux_loss_coef=0.02)).save_pretrained(
        directory
    )


def ours(directory: str, dtype, backend: str = "auto", quantized_dtype=None) -> MixtralForCausalLM:
    quantization = None
    if quantized_dtype is not None:
        quantization = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=quantized_dtype,
            llm_int8_skip_modules=["gate", "lm_head"],
        )
    model = MixtralForCausalLM.from_pretrained(directory, dtype=dtype, quantization_config=quantization)
    for module in model.modules():
        if isinstance(module, SparseMoeBlock):
            module.expert_backend = backend
    return model


def transformers_model(directory: str, dtype) -> transformers.MixtralForCausalLM:
    return transformers.MixtralForCausalLM.from_pretrained(directory, dtype=dtype)


def lora(model, r: int, experts: list[str] | None = None, expert_parameters: list[str] | None = None):
    config = peft.LoraConfig(
        r=r,
        lora_alpha=2 * r,
        lora_dropout=0.0,
        target_modules=ATTENTION + (experts or []),
        target_parameters=expert_parameters,
    )
    return peft.get_peft_model(model, config)


def backend_name(model) -> str:
    block = next(m for m in model.modules() if isinstance(m, SparseMoeBlock))
    if block.expert_backend != "auto":
        return block.expert_backend
    return expert_backend_for(list(block.experts.values()))


def build(scenario: str, directory: str, r: int, per_expert: bool = True) -> dict:
    kind, dtype_name = scenario.split("_")
    dtype = DTYPES[dtype_name]
    if kind == "lora":
        models = {"ours[auto]": lora(ours(directory, dtype), r, ["w1", "w2", "w3"])}
        if per_expert:
            models["ours[per_expert]"] = lora(ours(directory, dtype, "per_expert"), r, ["w1", "w2", "w3"])
        models["transformers+peft"] = lora(
            transformers_model(directory, dtype),
            r,
            expert_parameters=["experts.gate_up_proj", "experts.down_proj"],
        )
        return models
    if kind == "ckpt":
        # activation checkpointing as transformers' every_n_layers sets it; ratios against every layer
        models = {}
        for name, every in (("ours, every 2nd layer", 2), ("ours, off", None), ("ours, every layer", 1)):
            model = lora(ours(directory, dtype), r, ["w1", "w2", "w3"])
            if every:
                model.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=every)
            models[name] = model
        return models
    if kind == "qlora":
        return {
            "ours[auto]": lora(ours(directory, dtype, quantized_dtype=dtype), r, ["w1", "w2", "w3"]),
            "ours[per_expert]": lora(
                ours(directory, dtype, "per_expert", quantized_dtype=dtype), r, ["w1", "w2", "w3"]
            ),
        }
    theirs = transformers_model(directory, dtype)
    return {
        "ours[auto]": ours(directory, dtype),
        f"transformers[{theirs.config._experts_implementation}]": theirs,
    }


def step(model, input_ids) -> float:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=input_ids, labels=input_ids, output_router_logits=True).loss
    loss.backward()
    return loss.item()


def bench(scenario: str, directory: str, shape: dict, repeats: int, r: int, per_expert: bool) -> list[str]:
    models = build(scenario, directory, r, per_expert)
    for model in models.values():
        model.train()
    input_ids = torch.randint(
        0, shape["vocab_size"], (shape["batch"], shape["seq"]), generator=torch.Generator().manual_seed(1)
    )
    names = list(models)
    labels = {
        name: f"{name} -> {backend_name(m)}" if name.startswith("ours") else name
        for name, m in models.items()
    }
    losses = {name: step(model, input_ids) for name, model in models.items()}  # warm-up and check
    seconds = {name: [] for name in names}
    usage = {name: [] for name in names}  # (user s, system s, minor page faults) of each timed step
    for _ in range(repeats):
        for name in names:
            start, before = clock(), resource.getrusage(resource.RUSAGE_SELF)
            step(models[name], input_ids)
            seconds[name].append(clock() - start)
            after = resource.getrusage(resource.RUSAGE_SELF)
            usage[name].append(
                (
                    after.ru_utime - before.ru_utime,
                    after.ru_stime - before.ru_stime,
                    after.ru_minflt - before.ru_minflt,
                )
            )
    lines = []
    for name in names:
        user, system, faults = (statistics.median(column) for column in zip(*usage[name], strict=True))
        lines.append(
            f"| {scenario} | {labels[name]} | {statistics.median(seconds[name]):.2f} | "
            f"{' '.join(f'{s:.2f}' for s in seconds[name])} | loss {losses[name]:.5f}; "
            f"user {user:.2f} s, system {system:.2f} s, {faults:.0f} page faults |"
        )
    reference = names[-1]
    for name in names[:-1]:
        ratios = [theirs / mine for mine, theirs in zip(seconds[name], seconds[reference], strict=True)]
        lines.append(
            f"| {scenario} | **{name} / {reference}** | **{statistics.median(ratios):.2f}x** | "
            f"{' '.join(f'{x:.2f}' for x in ratios)} | speed ratio, median of rounds |"
        )
    del models
    return lines


def timed_backward(fn, *inputs) -> float:
    """Seconds for fn(*inputs).sum-like scalar .backward(), after one warm-up call."""
    for warm in (True, False):
        start = clock()
        fn(*inputs).backward()
        if not warm:
            return clock() - start
    raise AssertionError


def parts(directory: str, shape: dict, dtype_name: str, repeats: int) -> list[str]:
    """Where a full step's time goes: the MoE blocks (ours and transformers', all layers) and the
    output head with its loss (ours: `causal_lm_loss`; transformers': its `ForCausalLMLoss`, logits
    upcast to fp32 then cross-entropy), each timed forward + backward on its own at the step's shapes."""
    dtype = DTYPES[dtype_name]
    mine, theirs = ours(directory, dtype), transformers_model(directory, dtype)
    tokens = shape["batch"] * shape["seq"]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, tokens, shape["hidden_size"], generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, shape["vocab_size"], (tokens,), generator=g)
    blocks = {
        "ours MoE blocks": mine.model.layers[0].block_sparse_moe,
        "transformers MoE blocks": theirs.model.layers[0].mlp,
    }

    def head(h):
        return causal_lm_loss(mine.lm_head(h), labels[None])

    def their_head(h):
        return theirs.loss_function(theirs.lm_head(h), labels[None], vocab_size=shape["vocab_size"])

    rows = {name: [] for name in [*blocks, "ours output head + loss", "transformers output head + loss"]}
    for _ in range(repeats):
        for name, block in blocks.items():
            rows[name].append(
                shape["num_hidden_layers"] * timed_backward(lambda h, b=block: _moe_loss(b, h), x)
            )
        rows["ours output head + loss"].append(timed_backward(head, x))
        rows["transformers output head + loss"].append(timed_backward(their_head, x))
    return [
        f"| parts_{dtype_name} | {name} (x{shape['num_hidden_layers'] if 'MoE' in name else 1}) | "
        f"{statistics.median(seconds):.2f} | {' '.join(f'{t:.2f}' for t in seconds)} | fwd+bwd alone |"
        for name, seconds in rows.items()
    ]


def _moe_loss(block, h):
    out = block(h)
    out = out[0] if isinstance(out, tuple) else out
    return out.float().square().mean()


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if line.startswith("Model name")
        ),
        "unknown CPU",
    )
    return f"{model}, {torch.get_num_threads()} torch threads"


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per scenario")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 1 round")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall", help="wall time or process CPU time")
    parser.add_argument(
        "--no-per-expert", action="store_true", help="LoRA scenarios without ours[per_expert]"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    global clock
    clock = CLOCKS[args.clock]
    warnings.filterwarnings("ignore")
    transformers.utils.logging.disable_progress_bar()
    shape = QUICK if args.quick else FULL
    repeats = 1 if args.quick else args.repeats
    print(
        f"machine: {machine()}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"
    )
    print(
        f"shape: {shape}; LoRA r={args.rank}; {repeats} timed rounds after one warm-up step; {args.clock} clock"
    )
    print("| scenario | implementation | median s/step | rounds | |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as directory:
        save_random_init(shape, directory)
        for scenario in args.scenarios:
            before = load()
            if scenario.startswith("parts"):
                lines = parts(directory, shape, scenario.split("_")[1], repeats)
            else:
                lines = bench(scenario, directory, shape, repeats, args.rank, not args.no_per_expert)
            for line in lines:
                print(line, flush=True)
            print(
                f"| {scenario} | load before / after: {before.split('load average:')[-1].strip()} / "
                f"{load().split('load average:')[-1].strip()} | | | |",
                flush=True,
            )


if __name__ == "__main__":
    main()
