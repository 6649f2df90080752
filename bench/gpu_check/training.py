"""Section `training`: Mixtral-8x7B-shaped layers trained full bf16, LoRA and QLoRA, ours against
transformers' MixtralForCausalLM on the same weights: tokens/s, MFU, peak memory, parity of loss and gradients."""

import statistics
import traceback
from functools import partial

import torch

from bench.gpu_check.common import (
    Run,
    Section,
    allocated_gib,
    apply_peft_ours,
    apply_peft_transformers,
    attempt,
    bnb_config,
    build_ours,
    expert_backend_of,
    flops_per_token,
    fmt,
    free_memory,
    log,
    loss_and_grads,
    our_config,
    pct,
    peak_gib,
    peft_cfg,
    quantize_nf4_,
    quantized,
    rel_diff,
    reset_peak,
    set_expert_backend,
    time_steps,
    training_step,
    transformers_copy,
)


def measure(run: Run, model, input_ids, optimizer) -> dict:
    reset_peak(run)
    times = time_steps(run, training_step(model, input_ids, optimizer), run.shapes.warmup, run.shapes.repeats)
    return {"seconds": statistics.median(times), "steps": len(times), "peak_gib": peak_gib(run)}


def train_mode(run: Run, sec: Section, mode: str, layers: int) -> list[dict]:
    """One mode (full / lora / qlora) on `layers` Mixtral-shaped layers: transformers first (with our
    model resident; its own peak = measured peak - our resident bytes), then ours alone."""
    from mixtral_compat.transformers import experts_implementation

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
        backend = experts_implementation(theirs.config) or "?"
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
