"""What the sections of bench/gpu_check share: shapes, the run and its report files, timing and
memory helpers, and building our model and transformers' on the same weights."""

import contextlib
import dataclasses
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
GIB = 1024**3
# bf16 dense tensor-core peak, FLOP/s (NVIDIA datasheets, without sparsity).
BF16_PEAK = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
             ("GH200", 989e12), ("A100", 312e12), ("B200", 2250e12)]  # fmt: skip
CPU_ESTIMATE_QLORA_GIB = 29.3  # only quoted when mixtral_tune/estimate.py cannot be imported on the machine

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
            "How each number is measured: the docstring of bench/gpu_check/__init__.py.",
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

    fields = {**shape, "num_hidden_layers": layers, "output_router_logits": True, "use_cache": False,
              "attn_implementation": "sdpa"}  # fmt: skip
    return MixtralConfig(**{**fields, **overrides})


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
    """configs/peft/<method>.yaml over the schema's defaults for the keys it leaves out (mixtral_tune.config's
    PeftConfig), as the pipelines read it (OmegaConf), or a plain namespace."""
    import yaml

    from mixtral_tune.config import PeftConfig

    raw = yaml.safe_load((REPO / "configs" / "peft" / f"{method}.yaml").read_text())
    for key in dataclasses.fields(PeftConfig):
        if key.name != "quant":
            raw.setdefault(key.name, key.default)
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

    from mixtral_compat.bitsandbytes import keep_4bit_training_layout

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
        keep_4bit_training_layout(new)  # no CPU inference repack in eval
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
