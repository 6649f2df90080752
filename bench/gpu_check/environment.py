"""Section `environment`: GPU, versions, and the expert backend `auto` picks for plain bf16 experts."""

import platform

import torch

from bench.gpu_check.common import (
    GIB,
    TINY,
    Run,
    Section,
    default_dtype,
    expert_backend_of,
    log,
    our_config,
    package_version,
)


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
