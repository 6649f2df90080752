"""Section `attention`: flash-attn 2 (if importable) and sdpa against an fp32 eager reference (outputs
and q/k/v gradients; causal, sliding window, packed sequences) and their fwd+bwd speed."""

import importlib.metadata
import importlib.util
import statistics

import torch

from bench.gpu_check.common import Run, Section, rel_diff, time_steps


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
