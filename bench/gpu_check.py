"""One GPU command that measures everything GPU-only and writes it to a dated markdown + json file.

    python bench/gpu_check.py --out bench/results            # one H100/H200: stops itself after --budget-s (450)
    python bench/gpu_check.py --dry-run --out /tmp/check     # tiny shapes on CPU (automatic without CUDA), < 60 s
    python bench/gpu_check.py --only training,qlora_memory   # a subset of the sections below

It needs torch (CUDA), transformers >= 5.24, peft, bitsandbytes, sentencepiece (imported by
`mixtral_model`), hydra-core/omegaconf (imported by mixtral_tune/training/model_factory.py); flash-attn is optional.

Sections, in order (each one records its error and the script moves on; once the time budget
`--budget-s` is spent the remaining sections are skipped; the files are rewritten after every section):

1. environment: GPU, versions, the expert backend `auto` picks for plain bf16 experts;
2. nf4_build: the in-memory NF4 quantization used below (a model built on the GPU and quantized
   module by module) gives the same 4-bit weights and logits as `from_pretrained(quantization_config=
   mixtral_tune.training.model_factory.quantization_config(...))`, the factory's path;
3. attention: flash-attn 2 (if importable) and sdpa against an fp32 eager reference (outputs and q/k/v
   gradients; causal, sliding window, packed sequences with a window) and their fwd+bwd speed;
4. experts: our SparseMoeBlock's `grouped_loop` (and `auto`) against `per_expert`: output, input and every
   parameter gradient in bf16, and fwd+bwd speed;
5. training: Mixtral-8x7B-shaped layers (hidden 4096, intermediate 14336, 8 experts top-2, GQA 32/8,
   vocab 32000, batch 1 x 4096 tokens) for full bf16, LoRA and QLoRA (mixtral_tune.training.model_factory.apply_peft on
   configs/peft/{lora,qlora}.yaml), ours (`auto` and `per_expert` experts) against transformers'
   MixtralForCausalLM (+PEFT LoRA on its fused experts via `target_parameters`, +bitsandbytes) holding
   the same weights: tokens/s, MFU, peak memory, and auto-vs-per_expert parity of loss and gradients;
6. qlora_memory: QLoRA peak memory at 1 and N layers, per layer, extrapolated to 32 layers, beside the
   CPU estimate of mixtral_tune/memory.py (tests/test_qlora_memory.py);
7. mixtral_8x7b_qlora: the whole 32-layer model, random init made on the GPU layer by layer and quantized
   as it is made, trained as recipes/mixtral-8x7b/sft_qlora.yaml does (the factory's 4-bit preparation,
   LoRA r=16 with dropout on attention and experts, gradient checkpointing, the recipe's optimizer
   paged_adamw_8bit, bf16 autocast as the HF Trainer runs a bf16 model, TRL's fused LM head), 10 steps at
   4096 tokens: peak memory (per phase of a step, and the allocator's reserved peak) and tokens/s, beside
   a memory account: the persistent tensors sorted into components (mixtral_tune/memory.py's tensor_account,
   and qlora_account computed from the config), the checkpointed layer inputs, and the bytes one layer
   saves for backward while it is recomputed (saved-tensor hooks on the model cut to one layer);
8. profile: where a LoRA and a QLoRA step's time goes on one Mixtral-shaped layer, per expert backend
   (auto, grouped_loop, per_expert): GPU kernel time by kind (matmul, dequantize, attention, copy/cast,
   optimizer, ...), kernels launched per step, the GPU's busy share of the step, the largest kernels.

What a step is: forward (loss = CE + router aux loss, as the pipelines train) + backward; LoRA/QLoRA
also take an AdamW step on the adapters; full bf16 takes no optimizer step. Gradient checkpointing: off
for full bf16, on for LoRA/QLoRA (as the recipes). Timings: warm-up steps, then CUDA events around each
step, medians reported. MFU = FLOPs per token x tokens/s / bf16 dense peak of the detected GPU, with
FLOPs per token = 6 N_active + 6 L T d_attn for full training and 4 N_active + 6 L T d_attn for LoRA and
QLoRA (frozen weights need no weight gradient); N_active counts the attention projections, router, the
top-k experts and lm_head (not the embedding lookup); 6 L T d_attn is causal attention (QK^T and PV,
forward + backward, half of the T x T square); recomputation and LoRA adapter FLOPs are not counted.

QLoRA: ours goes through the factory (`mixtral_tune.training.model_factory.prepare_4bit_for_training`: frozen, unquantized
weights kept bf16); transformers' through `peft.prepare_model_for_kbit_training` (what TRL does for a 4-bit
model): every non-4-bit bf16 parameter becomes fp32, so its activations flow in fp32, and its fused
experts, which bitsandbytes does not quantize, are trained around in fp32. PEFT's
`target_parameters` (ParamWrapper) refuses lora_dropout != 0, so transformers' adapters run without the
recipe's dropout (0.05), which ours keeps.
"""

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import math
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3
# bf16 dense tensor-core peak, FLOP/s (NVIDIA datasheets, without sparsity).
BF16_PEAK = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
             ("GH200", 989e12), ("A100", 312e12), ("B200", 2250e12)]  # fmt: skip
CPU_ESTIMATE_QLORA_GIB = 29.3  # only quoted when mixtral_tune/memory.py cannot be imported on the machine

MIXTRAL_8X7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
    num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6,
)  # fmt: skip
TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4,
    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, rope_theta=1e4,
)  # fmt: skip


@dataclass
class Shapes:
    model: dict
    seq: int  # tokens per training step (batch 1)
    layers: int  # layers of the training comparison
    attn_parity_seq: int
    attn_speed_seq: int
    window: int
    moe_tokens: int
    full_model_layers: int
    full_model_steps: int
    warmup: int
    repeats: int


GPU_SHAPES = Shapes(
    model=MIXTRAL_8X7B, seq=4096, layers=4, attn_parity_seq=2048, attn_speed_seq=4096, window=1024,
    moe_tokens=4096, full_model_layers=32, full_model_steps=10, warmup=2, repeats=5,
)  # fmt: skip
DRY_SHAPES = Shapes(
    model=TINY, seq=64, layers=2, attn_parity_seq=64, attn_speed_seq=64, window=16,
    moe_tokens=64, full_model_layers=3, full_model_steps=2, warmup=1, repeats=2,
)  # fmt: skip


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Skip(Exception):
    """Raised by a section (or part of one) that cannot run here; the message is the reason."""


@dataclass
class Section:
    name: str
    status: str = "running"
    reason: str = ""
    seconds: float = 0.0
    lines: list = field(default_factory=list)
    data: dict = field(default_factory=dict)
    checks: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def say(self, line: str) -> None:
        self.notes.append(line)
        log(f"  {self.name}: {line}")

    def check(self, name: str, value: float, tol: float) -> bool:
        passed = bool(value <= tol)
        self.checks.append({"name": name, "value": value, "tol": tol, "passed": passed})
        log(f"  {self.name}: check {name}: {value:.3e} <= {tol:g} {'ok' if passed else 'FAILED'}")
        return passed


class Run:
    """Device, shapes, deadline, and the report files (rewritten after each section)."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
        self.dry = self.device.type == "cpu"
        self.shapes = DRY_SHAPES if self.dry else GPU_SHAPES
        if args.layers:
            self.shapes = dataclasses.replace(self.shapes, layers=args.layers)
        self.start = time.perf_counter()
        self.deadline = self.start + args.budget_s
        self.gpu = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu-dry-run"
        self.peak_flops = next((p for key, p in BF16_PEAK if key in self.gpu), None)
        self.sections: list[Section] = []
        self.results: dict = {}  # numbers one section hands to a later one
        self.summary: dict = {}  # headline numbers, shown first
        stem = f"gpu_{datetime.date.today().isoformat()}_{re.sub(r'[^A-Za-z0-9]+', '-', self.gpu).strip('-')}"
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        self.md_path, self.json_path = out / f"{stem}.md", out / f"{stem}.json"

    def time_left(self) -> float:
        return self.deadline - time.perf_counter()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def write(self) -> None:
        header = [
            f"# GPU check: {self.gpu}",
            "",
            f"{datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}, "
            f"`python bench/gpu_check.py{' --dry-run' if self.dry else ''}`, "
            f"{time.perf_counter() - self.start:.0f} s of a {self.args.budget_s:.0f} s budget. "
            "How each number is measured: the docstring of bench/gpu_check.py.",
            "",
        ]
        body = []
        if self.summary:
            body += ["## Summary", "", "| what | measured |", "|---|---|"]
            body += [f"| {k} | {v} |" for k, v in self.summary.items()] + [""]
        for s in self.sections:
            body += [f"## {s.name} ({s.status}, {s.seconds:.0f} s)", ""]
            if s.reason:
                body += [f"{'Error' if s.status == 'error' else 'Skipped'}: {s.reason}", ""]
            body += s.lines
            if s.notes:
                body += [""] + [f"- {note}" for note in s.notes]
            if s.checks:
                body += ["", "| check | value | tolerance | result |", "|---|---|---|---|"]
                body += [
                    f"| {c['name']} | {c['value']:.3e} | {c['tol']:g} | {'pass' if c['passed'] else 'FAIL'} |"
                    for c in s.checks
                ]
            body.append("")
        self.md_path.write_text("\n".join(header + body) + "\n")
        payload = {
            "gpu": self.gpu,
            "dry_run": self.dry,
            "budget_s": self.args.budget_s,
            "elapsed_s": time.perf_counter() - self.start,
            "summary": self.summary,
            "sections": {s.name: {k: v for k, v in s.__dict__.items() if k != "name"} for s in self.sections},
        }
        self.json_path.write_text(json.dumps(payload, indent=1, default=str) + "\n")

    def section(self, name: str, fn, min_seconds: float = 0.0) -> None:
        sec = Section(name)
        self.sections.append(sec)
        t0 = time.perf_counter()
        if self.time_left() <= min_seconds:
            sec.status, sec.reason = "skipped", f"time budget exhausted ({self.time_left():.0f} s left)"
        else:
            log(f"section {name} ({self.time_left():.0f} s left)")
            try:
                fn(self, sec)
                sec.status = "ok" if all(c["passed"] for c in sec.checks) else "checks failed"
                if sec.data.get("errors"):
                    sec.status, sec.reason = "error", f"parts failed: {', '.join(sec.data['errors'])}"
            except Skip as skip:
                sec.status, sec.reason = "skipped", str(skip)
            except Exception as error:  # noqa: BLE001 - record and go on: the GPU run happens once
                sec.status, sec.reason = "error", f"{type(error).__name__}: {error}"
                sec.data["traceback"] = traceback.format_exc(limit=8)
                log(traceback.format_exc(limit=8))
        sec.seconds = time.perf_counter() - t0
        log(f"section {name}: {sec.status} {sec.reason} ({sec.seconds:.1f} s)")
        free_memory(self.device)
        self.write()


# ---------------------------------------------------------------------------------------------- helpers


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def rel_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (mixtral_model.testing.max_relative_diff)."""
    from mixtral_model.testing import max_relative_diff

    return max_relative_diff(actual, expected)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def time_steps(run: Run, step, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of `step` after `warmup` calls; stops early when the budget runs out."""
    for _ in range(warmup):
        step()
    run.synchronize()
    times = []
    for _ in range(repeats):
        if run.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        if run.time_left() < 0:
            break
    return times


def peak_gib(run: Run) -> float | None:
    return torch.cuda.max_memory_allocated(run.device) / GIB if run.device.type == "cuda" else None


def reset_peak(run: Run) -> None:
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
        torch.cuda.reset_peak_memory_stats(run.device)


def allocated_gib(run: Run) -> float:
    return torch.cuda.memory_allocated(run.device) / GIB if run.device.type == "cuda" else 0.0


def fmt(value, spec=".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def pct(fraction) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.1f}%"


def our_config(shape: dict, layers: int, **overrides):
    from mixtral_model import MixtralConfig

    fields = {**shape, "num_hidden_layers": layers, "output_router_logits": True, "use_cache": False}
    config = MixtralConfig(**{**fields, **overrides})
    config._attn_implementation = "sdpa"
    return config


def flops_per_token(config, seq: int, frozen_base: bool) -> float:
    """6 (or 4 with a frozen base) x N_active + 6 L T d_attn (causal attention, forward + backward)."""
    d, hd = config.hidden_size, config.head_dim
    attention = d * hd * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    experts = config.num_experts_per_tok * 3 * d * config.intermediate_size
    router = config.num_local_experts * d
    n_active = config.num_hidden_layers * (attention + experts + router) + config.vocab_size * d
    attn_scores = 6 * config.num_hidden_layers * seq * config.num_attention_heads * hd
    return (4 if frozen_base else 6) * n_active + attn_scores


def expert_backend_of(model) -> str:
    """What `auto` picks for the first MoE block of `model` (whatever wraps its experts)."""
    from mixtral_model.moe import SparseMoeBlock

    block = next(m for m in model.modules() if isinstance(m, SparseMoeBlock))
    try:
        from mixtral_model.moe import expert_backend_for

        return expert_backend_for(list(block.experts.values()))
    except Exception as error:  # noqa: BLE001 - the dispatch API may change under other branches
        return f"unknown ({type(error).__name__}: {error})"


def set_expert_backend(model, backend: str) -> None:
    from mixtral_model.moe import SparseMoeBlock

    for module in model.modules():
        if isinstance(module, SparseMoeBlock):
            module.expert_backend = backend


# --------------------------------------------------------------------------- model building (ours, theirs)


def build_ours(config, device: torch.device, seed: int = 0):
    """Our MixtralForCausalLM in bf16 on `device`, initialised there by the model's own rule."""
    from mixtral_model import MixtralForCausalLM

    torch.manual_seed(seed)
    with torch.device(device), default_dtype(torch.bfloat16):
        model = MixtralForCausalLM(config)
    return model.train()


def transformers_copy(ours, device: torch.device):
    """transformers' MixtralForCausalLM (bf16, sdpa, its default experts backend) with our weights."""
    import transformers

    c = ours.config
    config = transformers.MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, num_local_experts=c.num_local_experts,
        num_experts_per_tok=c.num_experts_per_tok, rope_theta=c.rope_parameters["rope_theta"],
        router_aux_loss_coef=c.router_aux_loss_coef, output_router_logits=True, use_cache=False,
        attn_implementation="sdpa",
    )  # fmt: skip
    with torch.device(device), default_dtype(torch.bfloat16):
        theirs = transformers.MixtralForCausalLM(config)
    from mixtral_model.testing import copy_experts_to_transformers

    with torch.no_grad():
        for name, param in ours.state_dict().items():  # hub keys
            if ".block_sparse_moe.experts." not in name:
                theirs.get_parameter(name.replace(".block_sparse_moe.", ".mlp.")).copy_(param)
    for layer, theirs_layer in zip(ours.model.layers, theirs.model.layers, strict=True):
        copy_experts_to_transformers(layer.block_sparse_moe.experts, theirs_layer.mlp.experts)
    return theirs.train()


def peft_cfg(method: str):
    """configs/peft/<method>.yaml as the pipelines read it (OmegaConf), or a plain namespace."""
    import yaml

    raw = yaml.safe_load((REPO / "configs" / "peft" / f"{method}.yaml").read_text())
    raw.setdefault("train_router", False)
    try:
        from omegaconf import OmegaConf

        return OmegaConf.create({"peft": raw})
    except ImportError:
        import types

        quant = types.SimpleNamespace(**raw.pop("quant", {}))
        return types.SimpleNamespace(peft=types.SimpleNamespace(**raw, quant=quant))


def bnb_config(cfg):
    """The factory's BitsAndBytesConfig for this peft config."""
    from mixtral_tune.training.model_factory import quantization_config

    return quantization_config(cfg)


def quantize_nf4_(model, quant, device: torch.device, root=None) -> None:
    """Replace every nn.Linear under `root` (default: the model) not named in the skip list by a
    bitsandbytes Linear4bit quantized on `device`, as transformers' bitsandbytes loader builds them."""
    import bitsandbytes as bnb
    from torch import nn

    skip = set(quant.llm_int8_skip_modules or [])
    root = model if root is None else root
    for name, module in list(root.named_modules()):
        if not isinstance(module, nn.Linear) or name.rsplit(".", 1)[-1] in skip:
            continue
        new = bnb.nn.Linear4bit(
            module.in_features, module.out_features, module.bias is not None,
            quant.bnb_4bit_compute_dtype, compress_statistics=quant.bnb_4bit_use_double_quant,
            quant_type=quant.bnb_4bit_quant_type, quant_storage=quant.bnb_4bit_quant_storage, device="meta",
        )  # fmt: skip
        old = new.weight
        new.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, **old.__dict__).to(device)
        new.source_cls = type(module)
        new.requires_grad_(False)
        new.support_avx512bf16_for_cpu = False  # keep the training layout (no CPU inference repack in eval)
        root.set_submodule(name, new)
        del module
    model.is_loaded_in_4bit = True  # what transformers' bitsandbytes quantizer sets; PEFT reads it


def quantized(model, quant, device: torch.device):
    quantize_nf4_(model, quant, device)
    return model


def apply_peft_ours(model, cfg, gradient_checkpointing: bool):
    from mixtral_tune.training.model_factory import apply_peft

    return apply_peft(model, cfg, gradient_checkpointing)


def apply_peft_transformers(model, cfg, gradient_checkpointing: bool):
    """The same adapters on transformers' Mixtral: LoRA on q/k/v/o, and on its fused 3-D experts
    through PEFT's `target_parameters` (what PEFT offers for transformers 5's experts). PEFT's
    ParamWrapper refuses lora_dropout != 0, so transformers' adapters run without dropout."""
    import peft

    p = cfg.peft
    if p.method == "qlora":
        model = peft.prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = {"attention": (True, False), "experts": (False, True), "both": (True, True)}[p.targets]
    lora = peft.LoraConfig(
        r=p.r,
        lora_alpha=p.alpha,
        lora_dropout=0.0 if targets[1] else p.dropout,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"] if targets[0] else [],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if targets[1] else None,
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, lora)


def attempt(run: Run, sec: Section, label: str, fn):
    """fn(), or None after recording its error (for the reference side, whose failure must not stop ours)."""
    try:
        return fn()
    except Exception as error:  # noqa: BLE001
        sec.say(f"{label} failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
        sec.data.setdefault("errors", {})[label] = traceback.format_exc(limit=8)
        log(traceback.format_exc(limit=8))
        free_memory(run.device)
        return None


def training_step(model, input_ids, optimizer):
    def step():
        out = model(input_ids=input_ids, labels=input_ids)
        out.loss.backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)

    return step


def loss_and_grads(model, input_ids, reference: dict | None = None) -> tuple[torch.Tensor, dict]:
    """Loss and trainable gradients in eval mode (no dropout, no checkpointing), gradients then cleared.
    With `reference` (name -> gradient), returns name -> rel_diff against it instead of the gradients."""
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    grads = {
        n: p.grad.detach().clone() if reference is None else rel_diff(p.grad, reference[n])
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return loss.detach(), grads


# -------------------------------------------------------------------------------------------- sections


def environment(run: Run, sec: Section) -> None:
    from mixtral_model.moe import SparseMoeBlock

    sec.data.update(
        gpu=run.gpu,
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        bf16_peak_tflops=run.peak_flops / 1e12 if run.peak_flops else None,
        **{pkg: package_version(pkg) for pkg in ("transformers", "peft", "bitsandbytes", "flash_attn")},
    )
    if run.device.type == "cuda":
        props = torch.cuda.get_device_properties(run.device)
        sec.data.update(capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / GIB)
    config = our_config(TINY, 1)  # the choice depends on module types, dtype and device only
    with torch.device(run.device), default_dtype(torch.bfloat16):
        block = SparseMoeBlock(config)
    sec.data["auto_backend_plain_bf16_experts"] = expert_backend_of(block)
    sec.lines += ["| item | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in sec.data.items()]
    for k, v in sec.data.items():
        log(f"  {k}: {v}")


def nf4_build(run: Run, sec: Section) -> None:
    """In-memory NF4 quantization (used by the QLoRA sections) == the factory's from_pretrained path."""
    from mixtral_model import MixtralForCausalLM

    quant = bnb_config(peft_cfg("qlora"))
    config = our_config(TINY, 2)
    ours = build_ours(config, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        device_map = {"": torch.cuda.current_device()} if run.device.type == "cuda" else None
        loaded = MixtralForCausalLM.from_pretrained(
            tmp, dtype=torch.bfloat16, quantization_config=quant, device_map=device_map
        )
    ours = ours.to(run.device)
    quantize_nf4_(ours, quant, run.device)
    for module in loaded.modules():
        if type(module).__name__ == "Linear4bit":
            module.support_avx512bf16_for_cpu = False
    theirs_modules = dict(loaded.named_modules())
    mismatched = total = 0
    for name, module in ours.named_modules():
        if type(module).__name__ == "Linear4bit":
            other = theirs_modules[name]
            assert type(other).__name__ == "Linear4bit", (
                f"{name} is {type(other).__name__} after from_pretrained"
            )
            a, b = module.weight.data.view(torch.uint8), other.weight.data.view(torch.uint8)
            mismatched += int((a != b).sum())
            total += a.numel()
    ids = torch.randint(0, config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0)).to(
        run.device
    )
    with torch.no_grad():
        diff = rel_diff(ours.eval()(input_ids=ids).logits, loaded.eval()(input_ids=ids).logits)
    sec.say(f"{total} packed NF4 bytes compared, {mismatched} differ; logits max rel diff {diff:.2e}")
    sec.check("packed NF4 bytes differing (fraction)", mismatched / total, 0.0)
    sec.check("logits rel diff, in-memory vs from_pretrained NF4", diff, 1e-3)


def attention(run: Run, sec: Section) -> None:
    from mixtral_model.attention import eager_attention, sdpa_attention
    from mixtral_model.masks import AttentionLayout, packed_sequence_ids

    shape, s = run.shapes.model, run.shapes
    n, k = shape["num_attention_heads"], shape["num_key_value_heads"]
    hd = shape["hidden_size"] // n
    backends = {"sdpa": sdpa_attention}
    flash_reason = None
    if run.device.type != "cuda":
        flash_reason = "flash-attn needs CUDA (dry run on CPU)"
    elif importlib.util.find_spec("flash_attn") is None:
        flash_reason = (
            "flash-attn not installable on this machine (PyPI has only its source distribution; no prebuilt "
            "wheel for this torch/CUDA/Python could be carried)"
        )
    else:
        from mixtral_model.flash_attention import check_flash_attention_available, flash_attention

        try:
            check_flash_attention_available()
            backends["flash_attention_2"] = flash_attention
        except ImportError as error:
            flash_reason = str(error)
    if flash_reason:
        sec.say(f"flash_attention_2 skipped: {flash_reason}")
    sec.data["flash_skipped"] = flash_reason

    def layouts(t: int) -> dict:
        half = torch.arange(t, device=run.device)
        position_ids = torch.where(half < t // 2, half, half - t // 2)[None]  # two packed sequences
        return {
            "causal": AttentionLayout(q_start=0, q_len=t),
            f"window {s.window}": AttentionLayout(q_start=0, q_len=t, sliding_window=s.window),
            f"packed x2 + window {s.window}": AttentionLayout(
                q_start=0, q_len=t, sequence_ids_BT=packed_sequence_ids(position_ids), sliding_window=s.window
            ),
        }

    def inputs(t: int):
        g = torch.Generator(device=run.device).manual_seed(0)

        def make(heads):
            return torch.randn(1, heads, t, hd, device=run.device, generator=g, dtype=torch.bfloat16)

        return make(n), make(k), make(k), make(n).transpose(1, 2)

    def fwd_bwd(fn, q, kk, v, grad, layout):
        q, kk, v = (x.detach().requires_grad_() for x in (q, kk, v))
        out = fn(q, kk, v, layout, hd**-0.5, 0.0, False)
        out.backward(grad)
        return out.detach(), q.grad, kk.grad, v.grad

    t = s.attn_parity_seq
    q, kk, v, grad = inputs(t)
    sec.lines += [
        "",
        f"Parity at {t} tokens (bf16; reference: eager attention in fp32 on the same inputs):",
        "",
    ]
    sec.lines += ["| layout | backend | out | dq | dk | dv |", "|---|---|---|---|---|---|"]
    for layout_name, layout in layouts(t).items():
        ref = fwd_bwd(eager_attention, q.float(), kk.float(), v.float(), grad.float(), layout)
        for name, fn in backends.items():
            got = fwd_bwd(fn, q, kk, v, grad, layout)
            diffs = [rel_diff(a, b) for a, b in zip(got, ref, strict=True)]
            sec.lines.append(f"| {layout_name} | {name} | " + " | ".join(f"{d:.2e}" for d in diffs) + " |")
            sec.check(f"{name} vs fp32 eager, {layout_name} (max of out/dq/dk/dv)", max(diffs), 2e-2)
        del ref
    t = s.attn_speed_seq
    q, kk, v, grad = inputs(t)
    sec.lines += ["", f"Speed, fwd+bwd, batch 1 x {t} tokens, {n}/{k} heads of {hd} (median ms):", ""]
    sec.lines += ["| layout | backend | ms |", "|---|---|---|"]
    speed = {}
    for layout_name, layout in list(layouts(t).items())[:2]:
        for name, fn in backends.items():
            times = time_steps(run, lambda: fwd_bwd(fn, q, kk, v, grad, layout), s.warmup, s.repeats)  # noqa: B023
            speed[f"{layout_name}/{name}"] = ms = 1e3 * statistics.median(times)
            sec.lines.append(f"| {layout_name} | {name} | {ms:.2f} |")
    sec.data["speed_ms"] = speed


def experts(run: Run, sec: Section) -> None:
    from mixtral_model.moe import SparseMoeBlock

    shape, s = run.shapes.model, run.shapes
    config = our_config(shape, 1)
    torch.manual_seed(0)
    with torch.device(run.device), default_dtype(torch.bfloat16):
        block = SparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, config.initializer_range)
    auto = expert_backend_of(block)
    g = torch.Generator(device=run.device).manual_seed(1)
    x = torch.randn(1, s.moe_tokens, config.hidden_size, device=run.device, generator=g, dtype=torch.bfloat16)
    grad = torch.randn(x.shape, device=run.device, generator=g, dtype=torch.bfloat16)

    def fwd_bwd(b, backend):
        b.expert_backend = backend
        b.zero_grad(set_to_none=True)
        xi = x.detach().to(next(b.parameters()).dtype).requires_grad_()
        out, _ = b(xi)
        out.backward(grad.to(out.dtype))
        return {"out": out.detach(), "dx": xi.grad, **{n: p.grad for n, p in b.named_parameters()}}

    backends = ["per_expert", "grouped_loop"]
    backends += ["auto"] if auto not in backends else []
    sec.say(f"auto picks {auto}; {s.moe_tokens} tokens, hidden {config.hidden_size}, intermediate "
            f"{config.intermediate_size}, {config.num_local_experts} experts top-{config.num_experts_per_tok}, bf16")  # fmt: skip
    results = {"per_expert": fwd_bwd(block, "per_expert")}
    for backend in backends[1:]:
        result = attempt(run, sec, f"experts/{backend}", partial(fwd_bwd, block, backend))
        if result is not None:
            results[backend] = result
    backends = list(results)
    with torch.device(run.device):
        block32 = SparseMoeBlock(config)
    block32.load_state_dict({k: v.float() for k, v in block.state_dict().items()})
    truth = fwd_bwd(block32, "per_expert")
    del block32
    sec.lines += ["", "Max relative difference (max over all parameter gradients for 'weights'):", ""]
    sec.lines += ["| backend | vs | out | dx | weights |", "|---|---|---|---|---|"]
    for backend, res in results.items():
        for ref_name, ref in (("per_expert bf16", results["per_expert"]), ("per_expert fp32", truth)):
            if backend == "per_expert" and ref_name == "per_expert bf16":
                continue
            d_out, d_dx = rel_diff(res["out"], ref["out"]), rel_diff(res["dx"], ref["dx"])
            d_w = max(
                rel_diff(res[n], ref[n])
                for n in res
                if n not in ("out", "dx") and res[n] is not None and ref[n] is not None
            )
            sec.lines.append(f"| {backend} | {ref_name} | {d_out:.2e} | {d_dx:.2e} | {d_w:.2e} |")
            if ref_name == "per_expert bf16":
                sec.check(
                    f"{backend} vs per_expert (bf16): max of out/dx/weight grads", max(d_out, d_dx, d_w), 2e-2
                )
    del results, truth
    sec.lines += ["", "| backend | fwd+bwd ms (median) | tokens/s |", "|---|---|---|"]
    speed = {}
    for backend in backends:
        times = time_steps(run, lambda: fwd_bwd(block, backend), s.warmup, s.repeats)  # noqa: B023
        ms = 1e3 * statistics.median(times)
        speed[backend] = ms
        sec.lines.append(f"| {backend} | {ms:.2f} | {s.moe_tokens / ms * 1e3:.0f} |")
    sec.data.update(auto=auto, speed_ms=speed)
    for backend in ("grouped_loop",):
        if backend in speed:
            ratio = speed["per_expert"] / speed[backend]
            sec.say(f"{backend} / per_expert speed: {ratio:.2f}x")
            run.summary[f"MoE block fwd+bwd, {backend} / per_expert (bf16)"] = f"{ratio:.2f}x"


def measure(run: Run, model, input_ids, optimizer) -> dict:
    reset_peak(run)
    times = time_steps(run, training_step(model, input_ids, optimizer), run.shapes.warmup, run.shapes.repeats)
    return {"seconds": statistics.median(times), "steps": len(times), "peak_gib": peak_gib(run)}


def train_mode(run: Run, sec: Section, mode: str, layers: int) -> list[dict]:
    """One mode (full / lora / qlora) on `layers` Mixtral-shaped layers: transformers first (with our
    model resident; its own peak = measured peak - our resident bytes), then ours alone."""
    s = run.shapes
    config = our_config(s.model, layers)
    cfg = peft_cfg(mode) if mode != "full" else None
    gc_on = mode != "full"
    input_ids = torch.randint(0, config.vocab_size, (1, s.seq), device=run.device,
                              generator=torch.Generator(device=run.device).manual_seed(2))  # fmt: skip
    rows = []
    free_memory(run.device)
    ours = build_ours(config, run.device)
    theirs = attempt(run, sec, f"{mode}/transformers build", partial(transformers_copy, ours, run.device))
    if mode == "qlora":
        quant = bnb_config(cfg)
        quantize_nf4_(ours, quant, run.device)
        if theirs is not None:  # its attention projections; its fused 3-D experts stay bf16
            theirs = attempt(run, sec, f"{mode}/transformers nf4",
                             partial(quantized, theirs, quant, run.device))  # fmt: skip
    free_memory(run.device)
    if mode != "full":
        ours = apply_peft_ours(ours, cfg, gc_on)
        if theirs is not None:
            theirs = attempt(run, sec, f"{mode}/transformers peft",
                             partial(apply_peft_transformers, theirs, cfg, gc_on))  # fmt: skip
    free_memory(run.device)

    def optimizer_for(model):
        if mode == "full":
            return None
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def eval_loss(model):
        with torch.no_grad():
            loss = model.eval()(input_ids=input_ids, labels=input_ids).loss.float()
        model.train()
        return loss

    def measure_with_optimizer(model):
        return measure(run, model, input_ids, optimizer_for(model))

    loss_ours = eval_loss(ours)
    sec.say(f"[{mode}, {layers} layers] loss ours {loss_ours.item():.4f}")
    if theirs is not None:
        loss_theirs = attempt(run, sec, f"{mode}/transformers loss", partial(eval_loss, theirs))
        if loss_theirs is not None:
            sec.say(f"[{mode}, {layers} layers] loss transformers {loss_theirs.item():.4f} (same weights)")
            if mode == "full":
                sec.check(f"[{mode}] loss rel diff, ours vs transformers (same weights, bf16)",
                          rel_diff(loss_ours, loss_theirs), 2e-2)  # fmt: skip
        resident = allocated_gib(run)
        result = attempt(run, sec, f"{mode}/transformers step",
                         partial(measure_with_optimizer, theirs))  # fmt: skip
        backend = getattr(theirs.config, "_experts_implementation", "?")
        del theirs
        free_memory(run.device)
        if result is not None:
            ours_static = allocated_gib(run)
            if result["peak_gib"] is not None:
                result.update(peak_gib=result["peak_gib"] - ours_static, resident_gib=resident - ours_static)
            rows.append({"model": "transformers", "backend": backend, **result})

    auto = expert_backend_of(ours)
    set_expert_backend(ours, "per_expert")
    loss_ref, grads_ref = loss_and_grads(ours, input_ids)
    set_expert_backend(ours, "auto")
    if auto != "per_expert":
        loss_auto, diffs = loss_and_grads(ours, input_ids, reference=grads_ref)
        worst = max(diffs.values())
        sec.check(
            f"[{mode}] ours auto ({auto}) vs per_expert: loss rel diff", rel_diff(loss_auto, loss_ref), 1e-2
        )
        sec.check(
            f"[{mode}] ours auto ({auto}) vs per_expert: max grad rel diff ({len(grads_ref)} tensors)",
            worst,
            5e-2,
        )
    del grads_ref
    free_memory(run.device)
    # the expert loop (auto on CPU, not yet on CUDA) is timed beside them until a GPU run decides
    extra = ["grouped_loop"] if mode != "full" and auto != "grouped_loop" else []
    for backend in ["auto"] + (["per_expert"] if auto != "per_expert" else []) + extra:
        if run.time_left() < 0:
            sec.say(f"[{mode}] ours[{backend}] skipped: time budget exhausted")
            continue
        set_expert_backend(ours, backend)
        result = measure(run, ours, input_ids, optimizer_for(ours))
        rows.append({"model": "ours", "backend": auto if backend == "auto" else backend, **result})
        free_memory(run.device)
    set_expert_backend(ours, "auto")
    del ours
    free_memory(run.device)

    per_token = flops_per_token(config, s.seq, frozen_base=mode != "full")
    for row in rows:
        row.update(mode=mode, layers=layers, tokens_per_s=s.seq / row["seconds"])
        row["mfu"] = per_token * row["tokens_per_s"] / run.peak_flops if run.peak_flops else None
    return rows


def training(run: Run, sec: Section) -> None:
    s = run.shapes
    header = [
        f"Batch 1 x {s.seq} tokens, {s.layers} layers of shape {s.model}. Step: fwd+bwd (+AdamW on the "
        "adapters for LoRA/QLoRA); gradient checkpointing for LoRA/QLoRA only. Peak = max allocated during "
        "the timed steps, the other model's resident bytes subtracted. Ratio = transformers step time / ours.",
        "",
        "| mode | model | experts | layers | tokens/s | MFU | step ms | peak GiB | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    table, all_rows = [], []
    for mode in ("full", "lora", "qlora"):
        if run.time_left() < 0:
            sec.say(f"[{mode}] skipped: time budget exhausted")
            continue
        rows = train_mode_with_retry(run, sec, mode)
        theirs = next((r for r in rows if r["model"] == "transformers"), None)
        for r in rows:
            ratio = theirs["seconds"] / r["seconds"] if theirs else None
            r["speed_over_transformers"] = ratio
            if r["model"] == "ours" and r is next(x for x in rows if x["model"] == "ours"):
                run.summary[f"{mode}: ours ({r['backend']}), {r['layers']} layers"] = (
                    f"{r['tokens_per_s']:.0f} tokens/s, MFU {pct(r['mfu'])}, {fmt(ratio)}x transformers, "
                    f"peak {fmt(r['peak_gib'])} GiB (transformers {fmt(theirs and theirs['peak_gib'])})"
                )
            table.append(
                f"| {r['mode']} | {r['model']} | {r['backend']} | {r['layers']} | {r['tokens_per_s']:.0f} | "
                f"{pct(r['mfu'])} | {1e3 * r['seconds']:.1f} | {fmt(r['peak_gib'])} | {fmt(ratio)}x |"
            )
        all_rows += rows
        sec.data["rows"] = run.results["training_rows"] = all_rows
        sec.lines = header + table
        run.write()


def train_mode_with_retry(run: Run, sec: Section, mode: str) -> list[dict]:
    """train_mode, retried with half the layers after running out of memory; [] after any other error."""
    layers = run.shapes.layers
    while True:
        try:
            return train_mode(run, sec, mode, layers)
        except torch.cuda.OutOfMemoryError as error:
            free_memory(run.device)
            if layers == 1:
                sec.say(f"[{mode}] out of memory at 1 layer: {str(error).splitlines()[0]}")
                return []
            sec.say(f"[{mode}] out of memory at {layers} layers; retrying with {layers // 2}")
            layers //= 2
        except Exception as error:  # noqa: BLE001 - one mode failing must not lose the others
            sec.say(f"[{mode}] error: {type(error).__name__}: {error}")
            sec.data.setdefault("errors", {})[mode] = traceback.format_exc(limit=8)
            log(traceback.format_exc(limit=8))
            free_memory(run.device)
            return []


def qlora_memory(run: Run, sec: Section) -> None:
    rows = [r for r in run.results.get("training_rows", []) if r["mode"] == "qlora" and r["model"] == "ours"]
    if run.device.type != "cuda":
        sec.say("peak GPU memory needs CUDA: on CPU only the estimate below is computed")
    big = rows[0] if rows else None
    try:
        from mixtral_tune.config import LORA_TARGET_MODULES
        from mixtral_tune.memory import qlora_memory as estimate

        cpu_estimate = estimate(
            our_config(MIXTRAL_8X7B, 32), r=16, targets=LORA_TARGET_MODULES["both"], tokens=4096
        )["total"]
        source = "mixtral_tune/memory.py"
    except ImportError as error:
        cpu_estimate, source = CPU_ESTIMATE_QLORA_GIB, f"quoted from tests/test_qlora_memory.py ({error})"
    sec.data.update(cpu_estimate_gib=cpu_estimate)
    if run.device.type != "cuda":
        sec.say(f"CPU estimate for Mixtral-8x7B QLoRA at 4096 tokens: {cpu_estimate:.1f} GiB ({source})")
        return
    if big is None or big["layers"] < 2:
        raise Skip("needs the QLoRA rows (>= 2 layers) of the training section")
    single = train_one_qlora_peak(run, layers=1)
    per_layer = (big["peak_gib"] - single) / (big["layers"] - 1)
    projected = single + (32 - 1) * per_layer
    sec.data.update(peak_1_layer_gib=single, peak_n_layers_gib=big["peak_gib"], n_layers=big["layers"],
                    per_layer_gib=per_layer, projected_32_gib=projected)  # fmt: skip
    sec.lines += [
        "| quantity | GiB |", "|---|---|",
        f"| QLoRA peak, 1 layer (+ embeddings, lm_head) | {single:.2f} |",
        f"| QLoRA peak, {big['layers']} layers | {big['peak_gib']:.2f} |",
        f"| per layer | {per_layer:.3f} |",
        f"| projected to 32 layers (Mixtral-8x7B) | {projected:.2f} |",
        f"| CPU estimate ({source}) | {cpu_estimate:.2f} |",
    ]  # fmt: skip
    run.summary["QLoRA Mixtral-8x7B peak, projected from 1 and N layers"] = (
        f"{projected:.1f} GiB (CPU estimate {cpu_estimate:.1f})"
    )
    sec.check("projected 32-layer QLoRA peak GiB <= 32 (issue 11 goal; mixtral_tune/memory.py's GB is GiB)",
              projected, 32.0)  # fmt: skip


def train_one_qlora_peak(run: Run, layers: int) -> float:
    s = run.shapes
    config = our_config(s.model, layers)
    cfg = peft_cfg("qlora")
    model = build_ours(config, run.device)
    quantize_nf4_(model, bnb_config(cfg), run.device)
    free_memory(run.device)
    model = apply_peft_ours(model, cfg, True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(0, config.vocab_size, (1, s.seq), device=run.device)
    result = measure(run, model, ids, optimizer)
    del model, optimizer
    free_memory(run.device)
    return result["peak_gib"]


def build_ours_layer_by_layer(config, device: torch.device, quant):
    """The whole model on the meta device, then each piece made on `device` in bf16, initialised by the
    model's own rule and (its Linear layers) quantized to NF4 before the next piece is made."""
    from mixtral_model import MixtralForCausalLM

    torch.manual_seed(0)
    with torch.device("meta"), default_dtype(torch.bfloat16):
        model = MixtralForCausalLM(config)
    pieces = [model.model.embed_tokens, model.model.norm, model.lm_head, model.model.rotary_emb]
    with torch.no_grad():
        for piece in pieces + list(model.model.layers):
            piece.to_empty(device=device)
            for module in piece.modules():
                model._init_weights(module)
            if piece in model.model.layers:
                quantize_nf4_(model, quant, device, root=piece)
    model.is_loaded_in_4bit = True
    return model.train()


def recipe_trainer(recipe: str = "mixtral-8x7b/sft_qlora") -> dict:
    """The `trainer` section of a shipped recipe (optimizer, checkpointing, batch size)."""
    import yaml

    return yaml.safe_load((REPO / "recipes" / f"{recipe}.yaml").read_text()).get("trainer", {})


def recipe_optimizer(model, name: str, device: torch.device, lr: float):
    """The recipe's optimizer as the HF Trainer builds it for `optim: NAME` (bitsandbytes' paged 8-bit
    AdamW for paged_adamw_8bit); torch's AdamW where that needs CUDA (the CPU dry run)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "paged_adamw_8bit" and device.type == "cuda":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=lr), "adamw_8bit"
    return torch.optim.AdamW(params, lr=lr), "adamw"


def fused_lm_head(model) -> str:
    """TRL's fused, chunked LM head (what SFTTrainer/DPOTrainer put on the model: no (B, T, V) logits),
    added before PEFT as they do; the model's own full-logits loss where TRL is not installed."""
    try:
        from trl.trainer.utils import add_fused_lm_head
    except ImportError as error:
        return f"full logits (trl not importable: {error})"
    add_fused_lm_head(model)
    return "TRL's fused LM head (add_fused_lm_head), as the SFT trainer runs it"


def one_layer_saved_bytes(model, loss_of, autocast) -> dict:
    """Bytes one forward pass saves for backward, per part, on the model cut to its first layer, with
    gradient checkpointing off (what a layer holds while it is recomputed in backward)."""
    from torch import nn

    from mixtral_tune.memory import layer_parts, saved_bytes_by_module

    base = model.get_base_model()
    layers = base.model.layers
    base.model.layers = nn.ModuleList(layers[:1])
    checkpointing = base.is_gradient_checkpointing
    if checkpointing:
        base.gradient_checkpointing_disable()
    try:
        with saved_bytes_by_module(model, layer_parts(model)) as saved, autocast():
            loss_of(model).detach()
        return dict(saved)
    finally:
        base.model.layers = layers
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def mixtral_8x7b_qlora(run: Run, sec: Section) -> None:
    """The shipped recipe's settings (recipes/mixtral-8x7b/sft_qlora.yaml): the factory's QLoRA
    preparation and LoRA (configs/peft/qlora.yaml, dropout 0.05), gradient checkpointing, its optimizer,
    bf16 autocast as the HF Trainer runs a bf16 model, batch 1 x 4096 tokens."""
    from mixtral_tune.config import LORA_TARGET_MODULES
    from mixtral_tune.memory import qlora_account, tensor_account

    s = run.shapes
    config = our_config(s.model, s.full_model_layers)
    cfg = peft_cfg("qlora")
    trainer = recipe_trainer()
    t0 = time.perf_counter()
    reset_peak(run)
    model = build_ours_layer_by_layer(config, run.device, bnb_config(cfg))
    head = fused_lm_head(model)
    model = apply_peft_ours(model, cfg, bool(trainer.get("activation_checkpointing", True)))
    build_s = time.perf_counter() - t0
    weights = allocated_gib(run)
    sec.say(f"{s.full_model_layers} layers built and quantized in {build_s:.0f} s; "
            f"{fmt(weights)} GiB allocated; auto picks {expert_backend_of(model)}")  # fmt: skip
    optimizer, optimizer_kind = recipe_optimizer(
        model, trainer.get("optim", "adamw_torch"), run.device, float(trainer.get("learning_rate", 2e-4))
    )
    sec.say(f"optimizer {type(optimizer).__name__} (recipe: {trainer.get('optim')}); gradient checkpointing "
            f"{model.get_base_model().is_gradient_checkpointing}; bf16 autocast {run.device.type == 'cuda'}; "
            f"loss head: {head}")  # fmt: skip
    ids = torch.randint(0, config.vocab_size, (1, s.seq), device=run.device)

    def autocast():
        if run.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16)

    fused = head.startswith("TRL")

    def loss_of(m):
        return m(input_ids=ids, labels=ids, **({"fused_lm_head": True} if fused else {})).loss

    saved = one_layer_saved_bytes(model, loss_of, autocast)
    free_memory(run.device)
    losses, phases = [], []

    def step():
        reset_peak(run)
        with autocast():
            loss = loss_of(model)
        forward = peak_gib(run)
        loss.backward()
        backward = peak_gib(run)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        phases.append({"forward": forward, "backward": backward, "optimizer": peak_gib(run)})
        losses.append(loss.detach())

    times = time_steps(run, step, 0, s.full_model_steps)
    losses = [loss.item() for loss in losses]
    steady = times[1:] or times
    tokens_per_s = s.seq / statistics.median(steady)
    mfu = flops_per_token(config, s.seq, True) * tokens_per_s / run.peak_flops if run.peak_flops else None
    peak = max((max(v for v in p.values() if v is not None) for p in phases if p["forward"] is not None),
               default=None)  # fmt: skip
    stats = torch.cuda.memory_stats(run.device) if run.device.type == "cuda" else {}

    # the account: persistent tensors measured (and computed from the config), activations from the
    # checkpointed layer inputs and the bytes one layer saves for backward while it is recomputed
    targets = LORA_TARGET_MODULES[cfg.peft.targets]
    measured = tensor_account(model, optimizer)
    grads = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    measured["lora_grads"] = grads  # zero_grad(set_to_none) freed them; they live from backward to step
    computed = qlora_account(
        config, r=cfg.peft.r, targets=targets, unquantized_bytes=2, optimizer=optimizer_kind
    )
    act_bytes = model.get_base_model().model.embed_tokens.weight.element_size()  # the residual stream's dtype
    activations = {
        f"checkpointed layer inputs ({config.num_hidden_layers} x {s.seq} x {config.hidden_size} x {act_bytes} B)":
            config.num_hidden_layers * s.seq * config.hidden_size * act_bytes,
        "one layer recomputed: attention (saved for backward)": saved.get("layer0.attention", 0),
        "one layer recomputed: MoE block (saved for backward)": saved.get("layer0.moe", 0),
        "one layer recomputed: norms (saved for backward)":
            saved.get("layer0.input_norm", 0) + saved.get("layer0.post_attention_norm", 0) + saved.get("layer0", 0),
        "final norm, lm_head, loss (saved for backward)":
            saved.get("final_norm", 0) + saved.get("lm_head", 0) + saved.get("other", 0),
    }  # fmt: skip
    # bitsandbytes' paged optimizers keep their state in CUDA unified memory, outside torch's allocator
    paged = "Paged" in type(optimizer).__name__
    in_allocator = {k: v for k, v in measured.items() if not (paged and k == "optimizer_state")}
    account_total = sum(in_allocator.values()) + sum(activations.values())
    sec.data.update(layers=s.full_model_layers, steps=len(times), step_seconds=times, build_s=build_s,
                    peak_gib=peak, weights_gib=weights, tokens_per_s=tokens_per_s, mfu=mfu,
                    phase_peaks_gib=phases, account_measured=measured, account_computed=computed,
                    activations=activations, saved_one_layer=saved, account_total_gib=account_total / GIB,
                    optimizer=type(optimizer).__name__,
                    memory_stats={k: stats.get(k) for k in ("reserved_bytes.all.peak", "active_bytes.all.peak",
                                  "inactive_split_bytes.all.peak", "num_alloc_retries", "num_ooms")})  # fmt: skip
    reserved = stats.get("reserved_bytes.all.peak")
    unit, size = ("MiB", 2**20) if run.dry else ("GiB", GIB)
    sec.lines += [
        "| quantity | value |", "|---|---|",
        f"| layers | {s.full_model_layers} |",
        f"| steps run (batch 1 x {s.seq} tokens) | {len(times)} of {s.full_model_steps} |",
        f"| optimizer | {type(optimizer).__name__} |",
        f"| step seconds | {', '.join(f'{t:.2f}' for t in times)} |",
        f"| losses | {', '.join(f'{loss:.3f}' for loss in losses)} |",
        f"| tokens/s (median, steps 2..) | {tokens_per_s:.0f} |",
        f"| MFU (4N + attention) | {pct(mfu)} |",
        f"| allocated after build (GiB) | {fmt(weights)} |",
        f"| peak allocated (GiB), max over steps | {fmt(peak)} |",
        f"| peak reserved by the allocator (GiB) | {fmt(reserved and reserved / GIB)} |",
        f"| allocator retries (cudaFree + retry) | {stats.get('num_alloc_retries', 'n/a')} |",
        "| peak allocated per phase of the last step: forward / backward / optimizer (GiB) | "
        + (" / ".join(fmt(phases[-1][k]) for k in ("forward", "backward", "optimizer")) if phases else "n/a")
        + " |",
        "",
        f"Memory account ({unit}): persistent tensors measured on the model (computed from the config by "
        "mixtral_tune/memory.py's qlora_account beside them), activations from the checkpointed inputs and the "
        "bytes one layer saves for backward (saved-tensor hooks on the model cut to one layer, checkpointing off).",
        "",
        "| component | measured | computed |", "|---|---|---|",
    ]  # fmt: skip
    for key, value in measured.items():
        label = key + (" (paged: unified memory, not in the total)" if key not in in_allocator else "")
        sec.lines.append(f"| {label} | {value / size:.3f} | {computed.get(key, 0) / size:.3f} |")
    for key, value in activations.items():
        sec.lines.append(f"| {key} | {value / size:.3f} | |")
    sec.lines += [
        f"| **account total ({unit})** | **{account_total / size:.2f}** | |",
        f"| measured peak allocated | {fmt(peak)} | |",
        f"| peak minus account (backward transients: gradients of the recomputed layer, dequantized "
        f"experts, logits' gradient) | {fmt(peak and peak - account_total / GIB)} | |",
    ]
    run.summary[f"QLoRA Mixtral-8x7B shape, {s.full_model_layers} layers, measured"] = (
        f"{tokens_per_s:.0f} tokens/s, MFU {pct(mfu)}, peak {fmt(peak)} GiB (account {account_total / GIB:.1f}), "
        f"{len(times)} steps, {type(optimizer).__name__}"
    )
    # A random init predicts almost uniformly: after the final RMSNorm the hidden state has unit RMS, so
    # the logits are ~ N(0, sigma^2) with sigma = initializer_range * sqrt(hidden), and the expected
    # cross entropy is ln(vocab) + sigma^2 / 2 (plus the small router aux term).
    sigma2 = (config.initializer_range**2) * config.hidden_size
    expected = math.log(config.vocab_size) + sigma2 / 2
    sec.check("first loss vs ln(vocab) + sigma^2/2, relative (random init)",
              abs(losses[0] - expected) / expected, 0.02)  # fmt: skip
    sec.check("losses finite (1 = some not)", float(not all(math.isfinite(x) for x in losses)), 0.0)
    sec.check("persistent account: tensors measured vs computed from the config (max relative diff)",
              max(abs(measured[k] - computed[k]) / max(computed[k], 1) for k in computed), 1e-3)  # fmt: skip
    if run.device.type == "cuda":
        sec.check("Mixtral-8x7B QLoRA peak GiB <= 32 (issue 11 goal; mixtral_tune/memory.py's GB is GiB)",
                  peak, 32.0)  # fmt: skip


# What a kernel's (CUDA) or an op's (CPU dry run) name says it is; the first pattern that matches wins.
KERNEL_KINDS = (
    ("dequantize", r"dequant"),
    ("attention", r"flash|fmha|attention|attn"),
    ("matmul", r"gemm|cutlass|nvjet|xmma|cublas|aten::(mm|addmm|bmm|matmul|_grouped_mm)$"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("copy, cast", r"copy|cast|convert|memcpy|memset|fill"),
    ("index, scatter, sort", r"index|scatter|gather|sort|topk|nonzero|cumsum|histc|bincount"),
)
PROFILED_STEPS = 2
# seconds a section needs on a GPU: the whole model about a minute to build and run 10 steps on an H100
MIN_SECONDS = {"mixtral_8x7b_qlora": 90, "profile": 30}


def kernel_kind(name: str) -> str:
    return next((kind for kind, pattern in KERNEL_KINDS if re.search(pattern, name, re.I)), "other")


def kernel_times(prof, cuda: bool) -> list[tuple[str, int, float]]:
    """(name, calls, seconds) of each GPU kernel (CUDA), or of each aten op's own CPU time (dry run)."""
    from torch.autograd import DeviceType

    rows = []
    for event in prof.key_averages():
        if cuda and event.device_type == DeviceType.CUDA:
            rows.append((event.key, event.count, event.self_device_time_total / 1e6))
        elif not cuda and event.key.startswith("aten::"):
            rows.append((event.key, event.count, event.self_cpu_time_total / 1e6))
    return sorted((r for r in rows if r[2] > 0), key=lambda r: -r[2])


def timed_and_profiled(run: Run, step) -> tuple[float, list[tuple[str, int, float]]]:
    """Median seconds of `step` (timed without the profiler), then its kernels over PROFILED_STEPS steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = run.device.type == "cuda"
    seconds = statistics.median(time_steps(run, step, run.shapes.warmup, run.shapes.repeats))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(PROFILED_STEPS):
            step()
        run.synchronize()
    return seconds, kernel_times(prof, cuda)


def profile(run: Run, sec: Section) -> None:
    """Where a LoRA and a QLoRA step's time goes on one Mixtral-shaped layer, for each expert backend
    (auto, grouped_loop, per_expert): GPU kernel time by kind, kernels launched and GPU busy share of the
    step, and the largest kernels. A step with little busy time is bound by launching kernels, not by them."""
    s, cuda = run.shapes, run.device.type == "cuda"
    kinds = [kind for kind, _ in KERNEL_KINDS] + ["other"]
    input_ids = torch.randint(0, s.model["vocab_size"], (1, s.seq), device=run.device,
                              generator=torch.Generator(device=run.device).manual_seed(3))  # fmt: skip
    unit, calls = ("GPU kernel", "kernels/step") if cuda else ("CPU aten op (dry run)", "aten ops/step")
    sec.lines += [
        f"One layer, batch 1 x {s.seq} tokens, the training section's step (LoRA/QLoRA configs, gradient "
        f"checkpointing, AdamW), {PROFILED_STEPS} steps under torch.profiler after the timed ones. ms per step "
        f"of {unit} time by kind; busy = that time / step time (timed without the profiler).",
        "",
        f"| mode | experts | step ms | busy | {calls} | " + " | ".join(kinds) + " |",
        "|---|---|---|---|---|" + "---|" * len(kinds),
    ]
    rows, top = [], {}
    for mode in ("lora", "qlora"):
        cfg = peft_cfg(mode)
        model = build_ours(our_config(s.model, 1), run.device)
        if mode == "qlora":
            quantize_nf4_(model, bnb_config(cfg), run.device)
        model = apply_peft_ours(model, cfg, True)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        step = training_step(model, input_ids, optimizer)
        auto = expert_backend_of(model)
        for backend in dict.fromkeys([auto, "grouped_loop", "per_expert"]):
            if run.time_left() < 0:
                sec.say(f"[{mode}] {backend} skipped: time budget exhausted")
                continue
            set_expert_backend(model, "auto" if backend == auto else backend)
            measured = attempt(run, sec, f"profile/{mode}/{backend}", partial(timed_and_profiled, run, step))
            if measured is None:  # recorded; the other backends still run
                continue
            seconds, kernels = measured
            by_kind = dict.fromkeys(kinds, 0.0)
            for name, _, t in kernels:
                by_kind[kernel_kind(name)] += t / PROFILED_STEPS
            busy = sum(by_kind.values())
            launches = sum(calls for _, calls, _ in kernels) / PROFILED_STEPS
            label = f"{backend} (auto)" if backend == auto else backend
            rows.append({"mode": mode, "backend": backend, "auto": backend == auto, "step_ms": 1e3 * seconds,
                         "busy": busy / seconds, "launches": launches,
                         "ms_by_kind": {k: 1e3 * v for k, v in by_kind.items()}})  # fmt: skip
            top[f"{mode}/{backend}"] = [
                (n, c / PROFILED_STEPS, 1e3 * t / PROFILED_STEPS) for n, c, t in kernels[:10]
            ]
            sec.lines.append(
                f"| {mode} | {label} | {1e3 * seconds:.1f} | {pct(busy / seconds)} | {launches:.0f} | "
                + " | ".join(f"{1e3 * by_kind[k]:.1f}" for k in kinds)
                + " |"
            )
        set_expert_backend(model, "auto")
        del model, optimizer, step
        free_memory(run.device)
    for key, kernels in top.items():
        sec.lines += [
            "",
            f"Largest by {unit} time, {key} (per step):",
            "",
            "| name | calls | ms |",
            "|---|---|---|",
        ]
        sec.lines += [f"| `{name[:90]}` | {calls:.0f} | {ms:.2f} |" for name, calls, ms in kernels]
    sec.data.update(rows=rows, top=top)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", default=str(REPO / "bench" / "results"), help="directory for the .md and .json"
    )
    parser.add_argument(
        "--budget-s", type=float, default=450.0, help="total seconds; later sections are skipped"
    )
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (automatic without CUDA)")
    parser.add_argument("--layers", type=int, default=None, help="layers of the training comparison (GPU: 4)")
    parser.add_argument("--only", default=None, help="comma-separated section names to run (default: all)")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    run = Run(args)
    if run.dry:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    log(f"gpu_check on {run.gpu}: writing {run.md_path} and {run.json_path}")
    sections = [
        environment,
        nf4_build,
        attention,
        experts,
        training,
        qlora_memory,
        mixtral_8x7b_qlora,
        profile,
    ]
    only = set(args.only.split(",")) if args.only else {f.__name__ for f in sections}
    unknown = only - {f.__name__ for f in sections}
    if unknown:
        parser.error(
            f"--only: unknown sections {sorted(unknown)}; choose from {[f.__name__ for f in sections]}"
        )
    for fn in sections:
        if fn.__name__ in only:
            run.section(fn.__name__, fn, min_seconds=0 if run.dry else MIN_SECONDS.get(fn.__name__, 0))
    failed = [s.name for s in run.sections if s.status in ("error", "checks failed")]
    log(
        f"done in {time.perf_counter() - run.start:.0f} s; {run.md_path}; sections not ok: {failed or 'none'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
