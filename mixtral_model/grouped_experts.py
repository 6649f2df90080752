"""Grouped expert compute: the SwiGLU of all local experts read straight from their weights, with no
module call per expert, for plain `nn.Linear`, bitsandbytes 4-bit `Linear4bit` and PEFT LoRA experts,
and for ZeRO-3 experts once their block has gathered them (the block is a ZeRO-3 leaf module).

The experts keep their own modules (`experts.E.w1` ...), so state dicts keep the hub keys, PEFT targets
and saves per-expert adapters under the hub names, bitsandbytes quantizes each projection and ZeRO-3 or
ZeRO-1/2 own each parameter's storage. This file reads them:

    projection(x) = base(x) + lora_B(lora_A(dropout(x))) * scaling      (PEFT's LoRA Linear.forward)

* `grouped_loop` (`ExpertLoop`, the end of this file): one autograd node for the whole SwiGLU of every
  expert, LoRA included, computed expert by expert with PEFT's casts, dropout and additions in PEFT's
  order, so its output and every gradient equal `per_expert`'s bit for bit (tested, on CPU, for plain,
  LoRA with bf16 or PEFT's default fp32 adapters, 4-bit experts under PEFT's plain or bitsandbytes LoRA
  layer, with and without autocast). It keeps x, w1(x), w3(x) and the adapters' (M, r) products for
  backward (per_expert's autograd also keeps the fp32 casts, silu(w1 x), the product and w2's input:
  bench/results/cpu_2026-11-27_loop.md) and re-reads (4-bit: re-dequantizes) each expert's weights in
  backward. Where PEFT's numbers need something it does not reproduce (e.g. bf16 autocast over fp32
  base weights) and on CPUs without native bf16, it runs the per-projection path below.
* the per-projection path (`GroupedLinear`, one autograd node per projection over all experts, the
  LoRA adapter fused in when PEFT's dtype casts are no-ops (`fusable`; else the base node plus PEFT's
  formula in autograd ops); 4-bit weights dequantized for all experts of a projection at once, in
  forward and again in backward, and freed after use). Dropout masks are drawn in PEFT's per-expert
  order (w1, w3, w2 of expert 0, then expert 1, ...), so a seeded run on CPU draws the very masks
  `per_expert` draws (`draw_dropout`); both paths use it.

Which backend is fastest is measured, not assumed (`moe.choose_expert_backend`,
bench/results/cpu_2026-11-27.md).

`read_projection` returns None for anything else (merged or disabled adapters, several active adapters,
DoRA and other LoRA variants, biases, modules with hooks, CPU-packed 4-bit weights, unequal ranks or
scalings across experts); the block then runs `per_expert`, the reference every path is tested against.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mixtral_compat.bitsandbytes import compute_dtype, linear4bit_class, quant_state, readable_quant_state
from mixtral_compat.deepspeed import zero3_data_present
from mixtral_compat.peft import lora_layer_kind, vanilla_lora_parts
from mixtral_compat.torch import cpu_has_native_bf16, has_hooks

GROUPED_KERNELS = ("grouped_loop",)


@dataclass
class LoraView:
    """One active vanilla LoRA adapter on a projection of every expert (equal rank and scaling)."""

    A: list[nn.Parameter]  # (r, I) per expert
    B: list[nn.Parameter]  # (O, r) per expert
    dropout: nn.Module  # expert 0's (each expert's module draws its own mask; all share p)
    dropouts: list[nn.Module]
    scaling: float
    cast_input: bool  # LoraLayer.cast_input_dtype_enabled
    bnb: bool  # PEFT's 4-bit LoRA layer: casts the LoRA output to the base dtype before adding


@dataclass
class ProjectionView:
    """w1, w3 or w2 of every local expert: base weights (plain or 4-bit) and an optional LoRA."""

    bases: list[nn.Module]  # nn.Linear or bitsandbytes Linear4bit, one per expert
    quantized: bool
    lora: LoraView | None


def _readable_base(layer: nn.Module) -> str | None:
    """'plain' or '4bit' for a bias-free base layer whose weight can be read, else None."""
    if has_hooks(layer) or getattr(layer, "bias", None) is not None:
        return None
    if type(layer) is nn.Linear:
        return "plain"
    linear4bit = linear4bit_class()
    if linear4bit is not None and type(layer) is linear4bit:
        return "4bit" if readable_quant_state(layer) else None
    return None


def read_projection(layers: Sequence[nn.Module]) -> ProjectionView | None:
    """A grouped view of one projection (w1, w3 or w2) over the local experts, or None (use per_expert)."""
    kinds = {lora_layer_kind(layer) for layer in layers}
    if kinds == {None}:
        bases, lora = list(layers), None
    elif len(kinds) != 1:
        return None
    else:
        parts = [vanilla_lora_parts(layer) for layer in layers]
        if any(part is None for part in parts):
            return None
        bases = [part.base for part in parts]
        dropouts = [part.dropout for part in parts]
        scalings = {part.scaling for part in parts}
        ps = {getattr(d, "p", 0.0) if isinstance(d, nn.Dropout) else 0.0 for d in dropouts}
        dropout_kinds = {type(d) for d in dropouts}
        if (
            len(scalings) != 1
            or len(ps) != 1
            or len(dropout_kinds) != 1
            or dropout_kinds - {nn.Dropout, nn.Identity}
        ):
            return None
        if len({part.A.shape for part in parts}) != 1 or len({part.B.shape for part in parts}) != 1:
            return None
        lora = LoraView(
            A=[part.A for part in parts],
            B=[part.B for part in parts],
            dropout=dropouts[0],
            dropouts=dropouts,
            scaling=scalings.pop(),
            cast_input=all(part.cast_input for part in parts),
            bnb=kinds.pop() == "4bit",
        )
    kinds = {_readable_base(base) for base in bases}
    if len(kinds) != 1 or None in kinds:
        return None
    return ProjectionView(bases=bases, quantized=kinds.pop() == "4bit", lora=lora)


def gathered(weight: torch.Tensor) -> bool:
    """False for a ZeRO-3 partition whose full data is not present right now (outside its leaf module)."""
    return zero3_data_present(weight)


def projection_weights(view: ProjectionView) -> list[torch.Tensor]:
    return [base.weight for base in view.bases]


# ---------------------------------------------------------------- base projection


def _dequantize_all(bases: Sequence[nn.Module], dtype: torch.dtype) -> torch.Tensor:
    """Every expert's 4-bit weight dequantized into one (E, O, I) tensor of `dtype` by bitsandbytes'
    kernel, except on CPU for weights with fewer inputs than a quantization block, where bitsandbytes
    0.50's CPU kernel is wrong (`_dequantize_4bit_cpu`)."""
    import bitsandbytes.functional as bnbF

    states = [quant_state(base) for base in bases]
    first = bases[0].weight
    out_features, in_features = states[0].shape
    if not first.is_cuda and in_features < states[0].blocksize and _same_layout(states):
        return _dequantize_4bit_cpu([base.weight.data for base in bases], states, dtype)
    stacked = torch.empty(len(bases), out_features, in_features, dtype=states[0].dtype, device=first.device)
    for e, (base, state) in enumerate(zip(bases, states, strict=True)):
        if stacked.is_cuda:  # bitsandbytes 0.50 has no CPU kernel for the out= form
            bnbF.dequantize_4bit(base.weight.data, state, out=stacked[e])
        else:
            stacked[e] = bnbF.dequantize_4bit(base.weight.data, state)
    return stacked if stacked.dtype == dtype else stacked.to(dtype)


def _same_layout(states) -> bool:
    first = states[0]
    return all(
        s.shape == first.shape and s.blocksize == first.blocksize and torch.equal(s.code, first.code)
        for s in states
    )


def _absmax(state) -> torch.Tensor:
    """A quant state's per-block scales in fp32 (double quantization undone the way bitsandbytes does)."""
    if not state.nested:
        return state.absmax.float()
    import bitsandbytes.functional as bnbF

    return (bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()


def _dequantize_4bit_cpu(packed: Sequence[torch.Tensor], states, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' 4-bit dequantization (NF4 or FP4) of equally shaped weights in one pass of torch
    ops: every byte holds two 4-bit codes (high nibble first), value = code_table[c] * block absmax.
    Same numbers as `bitsandbytes.functional.dequantize_4bit` where that one is right (and slower
    than its CPU kernel, one thread); used where it is not: fewer than `blocksize` inputs."""
    first = states[0]
    code = first.code.float().to(packed[0].device)
    nibbles = torch.arange(256, device=code.device)
    pair_table = torch.stack([code[nibbles >> 4], code[nibbles & 15]], dim=-1)  # (256, 2)
    bytes_ = torch.cat([p.reshape(-1).view(torch.uint8) for p in packed])
    absmax = torch.cat([_absmax(s) for s in states])
    values = pair_table[bytes_.long()].view(-1, first.blocksize) * absmax[:, None]
    return values.to(dtype).view(len(states), *first.shape)


def _weights(bases: Sequence[nn.Module], quantized: bool, dtype: torch.dtype):
    """The base weights: 4-bit ones dequantized into one (E, O, I) tensor, plain ones as a list of their
    (O, I) weights (no copy)."""
    if quantized:
        return _dequantize_all(bases, dtype)
    return [base.weight.detach() for base in bases]


def _emulated_low_precision_cpu(t: torch.Tensor) -> bool:
    """bf16/fp16 on a CPU without native bf16 arithmetic (no AVX512-BF16/AMX: e.g. AMD Zen 3)."""
    if t.device.type != "cpu" or t.dtype not in (torch.bfloat16, torch.float16):
        return False
    return not cpu_has_native_bf16()


def _input_grad(grad_MO: torch.Tensor, w_OI: torch.Tensor) -> torch.Tensor:
    """grad @ w. In bf16/fp16 on a CPU without native bf16 through a transposed copy of w: there torch's
    low-precision GEMM is much slower when both operands are row-major (measured: docs/reference.md,
    "Measured numbers", MoE block); on CPUs with AVX512-BF16 it is not."""
    if _emulated_low_precision_cpu(w_OI):
        return grad_MO @ w_OI.t().contiguous().t()
    return grad_MO @ w_OI


def _row_ranges(counts: Sequence[int]) -> list[tuple[int, int]]:
    ranges, start = [], 0
    for count in counts:
        ranges.append((start, start + count))
        start += count
    return ranges


class GroupedLinear(torch.autograd.Function):
    """One projection of every local expert on its rows, with its LoRA adapter fused in when given:

        y[rows of e] = x_e W_e^T  (+ scaling * ((x_e * noise_e) A_e^T) B_e^T)

    W is read (4-bit: dequantized) in forward and again in backward, never saved; outputs and input
    gradients are written into one preallocated tensor (no per-expert results concatenated).
    params: A_0..A_{E-1}, B_0..B_{E-1} (with_lora), then the base weights when they take gradients."""

    @staticmethod
    def forward(ctx, x_MI, noise_MI, view, counts, with_lora, *params):
        num = len(counts)
        lora_A, lora_B = (params[:num], params[num : 2 * num]) if with_lora else ((), ())
        ctx.view, ctx.counts, ctx.with_lora = view, counts, with_lora
        ranges = _row_ranges(counts)
        weights = _weights(view.bases, view.quantized, x_MI.dtype)
        out_MO = x_MI.new_empty(x_MI.shape[0], weights[0].shape[0])
        for (start, end), w in zip(ranges, weights, strict=True):
            torch.mm(x_MI[start:end], w.t(), out=out_MO[start:end])
        z_MR = None
        if with_lora:
            dropped_MI = x_MI * noise_MI if noise_MI is not None else x_MI
            z_MR = x_MI.new_empty(x_MI.shape[0], lora_A[0].shape[0])
            for (start, end), a, b in zip(ranges, lora_A, lora_B, strict=True):
                torch.mm(dropped_MI[start:end], a.t(), out=z_MR[start:end])
                out_MO[start:end].addmm_(z_MR[start:end], b.t(), alpha=view.lora.scaling)
        ctx.save_for_backward(x_MI, noise_MI, z_MR, *lora_A, *lora_B)
        return out_MO

    @staticmethod
    def backward(ctx, grad_MO):
        x_MI, noise_MI, z_MR, *lora = ctx.saved_tensors
        view, counts, num = ctx.view, ctx.counts, len(ctx.counts)
        lora_A, lora_B = lora[:num], lora[num:]
        ranges = _row_ranges(counts)
        grad_MO = grad_MO.contiguous()
        grad_x = None
        if ctx.needs_input_grad[0]:
            weights = _weights(view.bases, view.quantized, grad_MO.dtype)
            grad_x = x_MI.new_empty(x_MI.shape)
            for (start, end), w in zip(ranges, weights, strict=True):
                grad_x[start:end] = _input_grad(grad_MO[start:end], w)
        lora_grads = []
        if ctx.with_lora:
            scaling = view.lora.scaling
            dropped_MI = x_MI * noise_MI if noise_MI is not None else x_MI
            grad_A, grad_B = [], []
            for (start, end), a, b in zip(ranges, lora_A, lora_B, strict=True):
                g = grad_MO[start:end]
                g_z = g @ b  # (m, r), before scaling
                grad_B.append(torch.mm(g.t(), z_MR[start:end]).mul_(scaling))
                grad_A.append(torch.mm(g_z.t(), dropped_MI[start:end]).mul_(scaling))
                if grad_x is not None:
                    if noise_MI is None:
                        grad_x[start:end].addmm_(g_z, a, alpha=scaling)
                    else:
                        grad_x[start:end].add_((g_z @ a).mul_(scaling) * noise_MI[start:end])
            lora_grads = grad_A + grad_B
        weight_grads = []
        if any(ctx.needs_input_grad[5 + len(lora_grads) :]):
            weight_grads = [grad_MO[start:end].t() @ x_MI[start:end] for start, end in ranges]
        return (grad_x, None, None, None, None, *lora_grads, *weight_grads)


def _trainable_base_weights(view: ProjectionView) -> list[torch.Tensor]:
    if view.quantized:
        return []
    weights = projection_weights(view)
    return weights if any(w.requires_grad for w in weights) else []


def base_projection(view: ProjectionView, x_MI: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The base layers' output on the sorted rows, in the dtype each base layer returns."""
    if view.quantized:
        input_dtype = x_MI.dtype
        compute = compute_dtype(view.bases[0], x_MI)
        for base in view.bases[1:]:
            compute_dtype(base, x_MI)
        return GroupedLinear.apply(x_MI.to(compute), None, view, counts, False).to(input_dtype)
    return GroupedLinear.apply(x_MI, None, view, counts, False, *_trainable_base_weights(view))


def fusable(view: ProjectionView, x_MI: torch.Tensor) -> bool:
    """LoRA can be fused into the base product when PEFT's casts are all no-ops: adapter, input and
    base compute in one dtype, no autocast."""
    if view.lora is None or torch.is_autocast_enabled():
        return False
    dtypes = {x_MI.dtype, view.lora.A[0].dtype, view.lora.B[0].dtype}
    if view.quantized:
        dtypes.add(compute_dtype(view.bases[0], x_MI))
        dtypes.update(compute_dtype(base, x_MI) for base in view.bases[1:])
    else:
        dtypes.add(view.bases[0].weight.dtype)
    return len(dtypes) == 1


def fused_projection(view, x_MI, noise_MI, counts) -> torch.Tensor:
    lora = view.lora
    return GroupedLinear.apply(
        x_MI, noise_MI, view, counts, True, *lora.A, *lora.B, *_trainable_base_weights(view)
    )


# ---------------------------------------------------------------- LoRA


def dropout_noise(shape: tuple[int, ...], p: float, like: torch.Tensor) -> torch.Tensor | None:
    """The multiplier `F.dropout(x, p, training=True)` applies on CPU (torch's `_dropout_impl`: a
    Bernoulli(1 - p) draw over x's shape and dtype, divided by 1 - p); None where it returns x as is.
    Drawn in the same order as per_expert's dropout calls, it consumes the same random numbers."""
    if p == 0 or math_prod(shape) == 0:
        return None
    if p == 1:
        return torch.zeros(shape, dtype=like.dtype, device=like.device)
    return torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(1 - p).div_(1 - p)


def math_prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def lora_input(view: ProjectionView, x_MI: torch.Tensor) -> torch.Tensor:
    lora = view.lora
    if lora.cast_input and x_MI.dtype != lora.A[0].dtype:
        return x_MI.to(lora.A[0].dtype)
    return x_MI


def draw_dropout(views: Sequence[ProjectionView], inputs: Sequence[torch.Tensor], counts: list[int]):
    """Dropout noise for each projection's LoRA input, drawn expert by expert and, within an expert,
    projection by projection in the order given -- the order per_expert's PEFT layers draw them.
    Returns one (M, I) noise tensor or None per projection (None: no dropout)."""
    active = [
        v.lora is not None
        and isinstance(v.lora.dropout, nn.Dropout)
        and v.lora.dropout.training
        and v.lora.dropout.p > 0
        for v in views
    ]
    if not any(active):
        return [None] * len(views)
    pieces = [[] for _ in views]
    for count in counts:
        for i, (view, x) in enumerate(zip(views, inputs, strict=True)):
            if not active[i]:
                continue
            shape = (count, x.shape[1])
            noise = dropout_noise(shape, view.lora.dropout.p, x)
            pieces[i].append(
                noise if noise is not None else torch.ones(shape, dtype=x.dtype, device=x.device)
            )
    return [torch.cat(p, dim=0) if active[i] else None for i, p in enumerate(pieces)]


def lora_delta(view: ProjectionView, x_MI: torch.Tensor, noise_MI, counts: list[int]) -> torch.Tensor:
    """lora_B(lora_A(dropout(x))) * scaling on every expert's rows (x already cast as PEFT casts it)."""
    lora = view.lora
    if noise_MI is not None:
        x_MI = x_MI * noise_MI
    slices = torch.split(x_MI, counts, dim=0)
    outputs = [
        F.linear(F.linear(rows, a), b) * lora.scaling
        for rows, a, b in zip(slices, lora.A, lora.B, strict=True)
    ]
    return torch.cat(outputs, dim=0)


def projection(view: ProjectionView, x_MI, lora_x_MI, noise_MI, counts) -> torch.Tensor:
    """PEFT's forward for one projection of all experts (LoRA Linear, or its 4-bit variant)."""
    if fusable(view, x_MI):
        return fused_projection(view, x_MI, noise_MI, counts)
    result = base_projection(view, x_MI, counts)
    if view.lora is None:
        return result
    delta = lora_delta(view, lora_x_MI, noise_MI, counts)
    if view.lora.bnb:
        result = result.clone()
        if not torch.is_autocast_enabled():
            delta = delta.to(result.dtype)
        return result + delta
    return (result + delta).to(result.dtype)


def grouped_swiglu(
    w1: ProjectionView,
    w3: ProjectionView,
    w2: ProjectionView,
    x_MD: torch.Tensor,
    counts: list[int],
) -> torch.Tensor:
    """w2(silu(w1 x) * w3 x) for every expert's slice of x_MD (rows sorted by expert, slice sizes = counts):
    the expert loop where it reproduces PEFT's numbers, else the per-projection path.

    Dropout noise for w2's LoRA input depends only on its shape, so it is drawn with w1's and w3's
    before the hidden state exists, in per_expert's order (w1, w3, w2 per expert)."""
    numerics = loop_numerics((w1, w3, w2), x_MD)
    if numerics is not None and not _emulated_low_precision_cpu(x_MD):
        return expert_loop((w1, w3, w2), x_MD, counts, numerics)
    lora_x = [lora_input(v, x_MD) if v.lora is not None else None for v in (w1, w3)]
    hidden_dtype = w2.lora.A[0].dtype if w2.lora is not None and w2.lora.cast_input else x_MD.dtype
    hidden_like = torch.empty(0, w2.bases[0].in_features, dtype=hidden_dtype, device=x_MD.device)
    noise1, noise3, noise2 = draw_dropout(
        (w1, w3, w2),
        (
            lora_x[0] if lora_x[0] is not None else x_MD,
            lora_x[1] if lora_x[1] is not None else x_MD,
            hidden_like,
        ),
        counts,
    )
    h_MF = F.silu(projection(w1, x_MD, lora_x[0], noise1, counts)) * projection(
        w3, x_MD, lora_x[1], noise3, counts
    )
    lora_h = lora_input(w2, h_MF) if w2.lora is not None else None
    return projection(w2, h_MF, lora_h, noise2, counts)


# ---------------------------------------------------------------- the expert loop (grouped_loop)
#
# What this adds over per_expert (PEFT's modules called per expert) and over the per-projection
# GroupedLinear above: the whole SwiGLU of every local expert -- w1, w3, silu * mul, w2 and their LoRA
# adapters -- is one autograd node that works expert by expert, so each expert's (m, F) intermediates
# are made, used and (in backward) consumed while they are still in cache, no (M, F) tensor of all
# experts passes through an elementwise op, and only h1 = w1(x) and h3 = w3(x) are kept for backward
# (per_expert's autograd keeps x's casts, silu(h1), the product and w2's input too). The numbers are
# PEFT's: the adapter computes in its own dtype (or the autocast dtype), its input cast and dropout as
# PEFT applies them, its output added the way PEFT's plain or bitsandbytes LoRA layer adds it.


@dataclass
class LoopNumerics:
    """The dtypes of one fused expert loop, read once per call (`loop_numerics`)."""

    compute: torch.dtype  # x, the base GEMMs, the SwiGLU and the output
    lora_input: torch.dtype | None  # the adapter's input dtype after PEFT's cast (dropout applies in it)
    lora_mm: torch.dtype | None  # the adapter GEMMs: the autocast dtype, else the adapter's own
    bnb: bool  # PEFT's 4-bit layer: the adapter output is cast to the base dtype before the add ...
    bnb_skips_casts: bool  # ... unless it skips its casts (CUDA autocast on)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def loop_numerics(views: Sequence[ProjectionView], x_MD: torch.Tensor) -> LoopNumerics | None:
    """The loop's dtypes, or None where it does not reproduce PEFT's numbers (the caller then runs the
    per-projection path): base weights (or 4-bit compute dtype) in x's dtype, under autocast only when
    that is the autocast dtype; every projection with an adapter or none; one adapter dtype."""
    autocast = _autocast_dtype(x_MD.device.type)
    compute = x_MD.dtype
    if autocast is not None and autocast != compute:
        return None
    for view in views:
        if view.quantized:
            if any(compute_dtype(base, x_MD) != compute for base in view.bases):
                return None
        elif view.bases[0].weight.dtype != compute:
            return None
    loras = [view.lora for view in views]
    if all(lora is None for lora in loras):
        return LoopNumerics(compute, None, None, False, False)
    if any(lora is None for lora in loras):
        return None
    adapter = {p.dtype for lora in loras for p in (*lora.A, *lora.B)}
    casts = {lora.cast_input for lora in loras}
    if len(adapter) != 1 or len(casts) != 1:
        return None
    adapter_dtype = adapter.pop()
    bnb = loras[0].bnb
    # PEFT's 4-bit LoRA layer skips its casts when `torch.is_autocast_enabled()` (no device: CUDA's
    # autocast) is on; its plain layer always casts the adapter input to the adapter dtype.
    bnb_skips_casts = bnb and torch.is_autocast_enabled()
    lora_input = adapter_dtype if casts.pop() and not bnb_skips_casts else compute
    if autocast is None and lora_input != adapter_dtype:
        return None  # PEFT's F.linear would refuse the mix
    return LoopNumerics(
        compute=compute,
        lora_input=lora_input,
        lora_mm=autocast or adapter_dtype,
        bnb=bnb,
        bnb_skips_casts=bnb_skips_casts,
    )


def _dequantize_one(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """One expert's 4-bit weight as (O, I) in dtype: bitsandbytes' kernel, or `_dequantize_4bit_cpu`
    where bitsandbytes 0.50's CPU kernel is wrong (as `_dequantize_all`)."""
    import bitsandbytes.functional as bnbF

    state = quant_state(base)
    if not base.weight.is_cuda and state.shape[1] < state.blocksize:
        return _dequantize_4bit_cpu([base.weight.data], [state], dtype)[0]
    weight = bnbF.dequantize_4bit(base.weight.data, state)
    return weight if weight.dtype == dtype else weight.to(dtype)


def _loop_weight(view: ProjectionView, e: int, dtype: torch.dtype) -> torch.Tensor:
    base = view.bases[e]
    return _dequantize_one(base, dtype) if view.quantized else base.weight.detach()


def _lora_forward(h_mO, x_mI, noise_mI, z_mR, a_RI, b_OR, scaling, nm: LoopNumerics) -> None:
    """PEFT's LoRA on one expert's rows, added in place to its base output h; z = A(dropout(x)) is
    written into z_mR. In place is bitwise PEFT's out-of-place sum: h + delta computed in their common
    dtype, rounded to h's (plain layer), or delta rounded to h's dtype first (4-bit layer without autocast)."""
    dropped = x_mI.to(nm.lora_input)
    if noise_mI is not None:
        dropped = dropped * noise_mI
    torch.mm(dropped.to(nm.lora_mm), a_RI.to(nm.lora_mm).t(), out=z_mR)
    delta = torch.mm(z_mR, b_OR.to(nm.lora_mm).t()).mul_(scaling)
    h_mO.add_(delta.to(h_mO.dtype) if nm.bnb and not nm.bnb_skips_casts else delta)


def _lora_backward(g_mO, x_mI, noise_mI, z_mR, a_RI, b_OR, scaling, nm: LoopNumerics):
    """Gradients of `_lora_forward`'s output g -> (grad A, grad B, this path's grad of x in x's dtype)."""
    dropped = x_mI.to(nm.lora_input)
    if noise_mI is not None:
        dropped = dropped * noise_mI
    a, b = a_RI.to(nm.lora_mm), b_OR.to(nm.lora_mm)
    g_delta = g_mO.to(nm.lora_mm).mul_(scaling) if g_mO.dtype != nm.lora_mm else g_mO * scaling
    grad_b = torch.mm(g_delta.t(), z_mR)
    g_z = torch.mm(g_delta, b)
    grad_a = torch.mm(g_z.t(), dropped.to(nm.lora_mm))
    g_x = torch.mm(g_z, a).to(nm.lora_input)
    if noise_mI is not None:
        g_x = g_x.mul_(noise_mI)
    return grad_a.to(a_RI.dtype), grad_b.to(b_OR.dtype), g_x.to(x_mI.dtype)


class ExpertLoop(torch.autograd.Function):
    """w2(silu(w1 x) * w3 x) of every local expert on its rows, LoRA included, expert by expert.

    params: (A, B) of w1, w3, w2 per expert when with_lora (A1_0.., B1_0.., A3.., B3.., A2.., B2..), then
    the base weights w1_0.., w3_0.., w2_0.. when they take gradients. Base weights are read (4-bit:
    dequantized one expert at a time) in forward and again in backward, never saved."""

    @staticmethod
    def forward(ctx, x_MD, noises, views, counts, nm, with_lora, train_base, *params):
        num = len(counts)
        loras = [params[2 * p * num : (2 * p + 2) * num] for p in range(3)] if with_lora else None
        ranges = _row_ranges(counts)
        rows = x_MD.shape[0]
        h1_MF = x_MD.new_empty(rows, views[0].bases[0].out_features)
        h3_MF = x_MD.new_empty(rows, views[1].bases[0].out_features)
        out_MD = x_MD.new_empty(rows, views[2].bases[0].out_features)
        # each projection's A(dropout(x)) for every row, kept for backward: (M, r) in the adapter GEMMs' dtype
        zs = (
            [x_MD.new_empty(rows, loras[p][0].shape[0], dtype=nm.lora_mm) for p in range(3)]
            if with_lora
            else []
        )
        for e, (start, end) in enumerate(ranges):
            if start == end:
                continue
            x = x_MD[start:end]
            for p, (view, h_MF) in enumerate(((views[0], h1_MF), (views[1], h3_MF))):
                h = torch.mm(x, _loop_weight(view, e, nm.compute).t(), out=h_MF[start:end])
                if with_lora:
                    noise = noises[p][start:end] if noises[p] is not None else None
                    a, b = loras[p][e], loras[p][num + e]
                    _lora_forward(h, x, noise, zs[p][start:end], a, b, view.lora.scaling, nm)
            act = F.silu(h1_MF[start:end]) * h3_MF[start:end]
            y = torch.mm(act, _loop_weight(views[2], e, nm.compute).t(), out=out_MD[start:end])
            if with_lora:
                noise = noises[2][start:end] if noises[2] is not None else None
                a, b = loras[2][e], loras[2][num + e]
                _lora_forward(y, act, noise, zs[2][start:end], a, b, views[2].lora.scaling, nm)
        ctx.views, ctx.counts, ctx.nm, ctx.with_lora, ctx.train_base = (
            views,
            counts,
            nm,
            with_lora,
            train_base,
        )
        # every tensor backward needs goes through save_for_backward, so activation checkpointing's
        # saved-tensor hooks see (and drop) them
        ctx.noise_present = [n is not None for n in noises]
        kept_noises = [n for n in noises if n is not None]
        ctx.save_for_backward(x_MD, h1_MF, h3_MF, *zs, *kept_noises, *(params if with_lora else ()))
        return out_MD

    @staticmethod
    def backward(ctx, grad_MD):
        x_MD, h1_MF, h3_MF, *rest = ctx.saved_tensors
        views, counts, nm, with_lora = ctx.views, ctx.counts, ctx.nm, ctx.with_lora
        num = len(counts)
        zs, rest = (rest[:3], rest[3:]) if with_lora else ([None] * 3, rest)
        kept = iter(rest[: sum(ctx.noise_present)])
        noises = [next(kept) if present else None for present in ctx.noise_present]
        lora_params = rest[sum(ctx.noise_present) :]
        loras = [lora_params[2 * p * num : (2 * p + 2) * num] for p in range(3)] if with_lora else None
        grad_MD = grad_MD.contiguous()
        grad_x = x_MD.new_zeros(x_MD.shape) if ctx.needs_input_grad[0] else None
        lora_grads = [[None] * (2 * num) for _ in range(3)]
        base_grads = [[None] * num for _ in range(3)]
        for e, (start, end) in enumerate(_row_ranges(counts)):
            x, h1, h3 = x_MD[start:end], h1_MF[start:end], h3_MF[start:end]
            if start == end:
                if with_lora:
                    for p in range(3):
                        lora_grads[p][e] = torch.zeros_like(loras[p][e])
                        lora_grads[p][num + e] = torch.zeros_like(loras[p][num + e])
                if ctx.train_base:
                    for p in range(3):
                        base_grads[p][e] = torch.zeros_like(views[p].bases[e].weight)
                continue
            g_y = grad_MD[start:end]
            silu_h1 = F.silu(h1)
            act = silu_h1 * h3
            g_act = torch.mm(g_y, _loop_weight(views[2], e, nm.compute))
            if with_lora:
                noise = noises[2][start:end] if noises[2] is not None else None
                ga, gb, gx = _lora_backward(
                    g_y,
                    act,
                    noise,
                    zs[2][start:end],
                    loras[2][e],
                    loras[2][num + e],
                    views[2].lora.scaling,
                    nm,
                )
                lora_grads[2][e], lora_grads[2][num + e] = ga, gb
                g_act = g_act + gx
            if ctx.train_base:
                base_grads[2][e] = torch.mm(g_y.t(), act)
            g_h1 = torch.ops.aten.silu_backward(g_act * h3, h1)
            g_h3 = g_act * silu_h1
            # x's gradient summed in the order autograd sums per_expert's: w3's adapter, w3, w1's adapter, w1
            for p, g_h in ((1, g_h3), (0, g_h1)):
                if with_lora:
                    noise = noises[p][start:end] if noises[p] is not None else None
                    ga, gb, gx = _lora_backward(
                        g_h,
                        x,
                        noise,
                        zs[p][start:end],
                        loras[p][e],
                        loras[p][num + e],
                        views[p].lora.scaling,
                        nm,
                    )
                    lora_grads[p][e], lora_grads[p][num + e] = ga, gb
                    if grad_x is not None:
                        grad_x[start:end] += gx
                if grad_x is not None:
                    grad_x[start:end] += torch.mm(g_h, _loop_weight(views[p], e, nm.compute))
                if ctx.train_base:
                    base_grads[p][e] = torch.mm(g_h.t(), x)
        flat_lora = [g for p in range(3) for g in lora_grads[p]] if with_lora else []
        flat_base = [g for p in range(3) for g in base_grads[p]] if ctx.train_base else []
        return (grad_x, None, None, None, None, None, None, *flat_lora, *flat_base)


def expert_loop(views, x_MD, counts, nm: LoopNumerics) -> torch.Tensor:
    """The fused loop over (w1, w3, w2) views: PEFT's numbers, dropout drawn in per_expert's order."""
    w1, w3, w2 = views
    with_lora = w1.lora is not None
    noises = (None, None, None)
    if with_lora:
        like_x = torch.empty(0, x_MD.shape[1], dtype=nm.lora_input, device=x_MD.device)
        like_h = torch.empty(0, w2.bases[0].in_features, dtype=nm.lora_input, device=x_MD.device)
        noises = tuple(draw_dropout((w1, w3, w2), (like_x, like_x, like_h), counts))
    train_base = not w1.quantized and any(w.requires_grad for view in views for w in projection_weights(view))
    params = []
    if with_lora:
        for view in (w1, w3, w2):
            params += [*view.lora.A, *view.lora.B]
    if train_base:
        for view in (w1, w3, w2):
            params += projection_weights(view)
    return ExpertLoop.apply(x_MD, noises, views, counts, nm, with_lora, train_base, *params)
