"""Section `experts`: SparseMoeBlock's `grouped_loop` (and `auto`) against `per_expert` (output, input and
parameter gradients in bf16) and fwd+bwd speed."""

import statistics
from functools import partial

import torch

from bench.gpu_check.common import (
    Run,
    Section,
    attempt,
    default_dtype,
    expert_backend_of,
    our_config,
    rel_diff,
    time_steps,
)


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
