"""Section `mixtral_8x7b_qlora`: the whole 32-layer model built layer by layer, quantized as it is made,
trained as recipes/mixtral-8x7b/sft_qlora.yaml does: peak memory, tokens/s and a memory account."""

import contextlib
import math
import statistics
import time

import torch

from bench.gpu_check.common import (
    GIB,
    REPO,
    Run,
    Section,
    allocated_gib,
    apply_peft_ours,
    bnb_config,
    default_dtype,
    expert_backend_of,
    flops_per_token,
    fmt,
    free_memory,
    our_config,
    pct,
    peak_gib,
    peft_cfg,
    quantize_nf4_,
    reset_peak,
    time_steps,
)


def build_ours_layer_by_layer(config, device: torch.device, quant):
    """The whole model on the meta device, then each piece made on `device` in bf16, initialised by the
    model's own rule and (its Linear layers) quantized to NF4 before the next piece is made."""
    from mixtral_compat.transformers import init_module_weights
    from mixtral_model import MixtralForCausalLM

    torch.manual_seed(0)
    with torch.device("meta"), default_dtype(torch.bfloat16):
        model = MixtralForCausalLM(config)
    pieces = [model.model.embed_tokens, model.model.norm, model.lm_head, model.model.rotary_emb]
    with torch.no_grad():
        for piece in pieces + list(model.model.layers):
            piece.to_empty(device=device)
            for module in piece.modules():
                init_module_weights(model, module)
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
        from mixtral_compat.trl import add_fused_lm_head
    except ImportError as error:
        return f"full logits (trl not importable: {error})"
    add_fused_lm_head(model)
    return "TRL's fused LM head (add_fused_lm_head), as the SFT trainer runs it"


def one_layer_saved_bytes(model, loss_of, autocast) -> dict:
    """Bytes one forward pass saves for backward, per part, on the model cut to its first layer, with
    gradient checkpointing off (what a layer holds while it is recomputed in backward)."""
    from torch import nn

    from mixtral_tune.memory_measure import layer_parts, saved_bytes_by_module

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
    from mixtral_tune.estimate import qlora_account
    from mixtral_tune.memory_measure import tensor_account

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
    measured = tensor_account(model, optimizer)
    grads = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    measured["lora_grads"] = grads  # zero_grad(set_to_none) freed them; they live from backward to step
    computed = qlora_account(
        config, r=cfg.peft.r, targets=cfg.peft.targets, unquantized_bytes=2, optimizer=optimizer_kind
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
        "mixtral_tune/estimate.py's qlora_account beside them), activations from the checkpointed inputs and the "
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
        sec.check("Mixtral-8x7B QLoRA peak GiB <= 32 (issue 11 goal; mixtral_tune/estimate.py counts GiB)",
                  peak, 32.0)  # fmt: skip
