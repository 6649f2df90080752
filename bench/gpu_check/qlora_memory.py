"""Section `qlora_memory`: QLoRA peak memory at 1 and N layers, per layer, extrapolated to 32 layers,
beside the CPU estimate of mixtral_tune/estimate.py."""

import torch

from bench.gpu_check.common import (
    CPU_ESTIMATE_QLORA_GIB,
    Run,
    Section,
    Skip,
    apply_peft_ours,
    bnb_config,
    build_ours,
    free_memory,
    our_config,
    peft_cfg,
    quantize_nf4_,
)
from bench.gpu_check.training import measure


def qlora_memory(run: Run, sec: Section) -> None:
    rows = [r for r in run.results.get("training_rows", []) if r["mode"] == "qlora" and r["model"] == "ours"]
    if run.device.type != "cuda":
        sec.say("peak GPU memory needs CUDA: on CPU only the estimate below is computed")
    big = rows[0] if rows else None
    try:
        from mixtral_tune.estimate import GIB, estimate_run

        estimate = estimate_run(["+recipe=mixtral-8x7b/sft_qlora"], world_size=1)
        cpu_estimate = estimate.memory_total / GIB
        source = "mixtral_tune/estimate.py, recipes/mixtral-8x7b/sft_qlora"
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
    sec.check("projected 32-layer QLoRA peak GiB <= 32 (issue 11 goal; mixtral_tune/estimate.py counts GiB)",
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
