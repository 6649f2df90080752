"""Section `profile`: where a LoRA and a QLoRA step's time goes on one Mixtral-shaped layer, per expert
backend: kernel (or, on CPU, aten op) time by kind, launches per step, busy share, largest kernels."""

import re
import statistics
from functools import partial

import torch

from bench.gpu_check.common import (
    Run,
    Section,
    apply_peft_ours,
    attempt,
    bnb_config,
    build_ours,
    expert_backend_of,
    free_memory,
    our_config,
    pct,
    peft_cfg,
    quantize_nf4_,
    set_expert_backend,
    time_steps,
    training_step,
)

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
