"""The grouped expert backend (`grouped_loop`, and its per-projection path) held to `per_expert` on the paths users
train: PEFT LoRA on the experts (dropout off and on), bitsandbytes NF4 experts with and without LoRA
(QLoRA), plain experts, fp32 and bf16 on CPU; outputs and every gradient (input, LoRA A/B, plain
weights). Plus the cases that must fall back to `per_expert`, and what the grouped 4-bit path keeps
for backward (never a dequantized weight).

Dropout: PEFT draws one mask per LoRA layer call, expert by expert (w1, w3, w2). The grouped path draws
the same Bernoulli masks in the same order before its grouped products (`grouped_experts.draw_dropout`),
so under one seed both paths apply identical masks and must agree to rounding, which is what is tested.
"""

import bitsandbytes as bnb
import pytest
import torch
from mixtral_reference import tiny_config
from peft import LoraConfig, get_peft_model
from torch import nn

from mixtral_model import MixtralConfig, MixtralForCausalLM
from mixtral_model.grouped_experts import _dequantize_4bit_cpu
from mixtral_model.moe import SparseMoeBlock, expert_backend_for, read_experts
from mixtral_model.testing import max_relative_diff, quantize_experts_nf4

GROUPED = ["grouped_loop"]
HIDDEN, INTERMEDIATE = 64, 128  # bitsandbytes 0.50 dequantizes wrongly on CPU below 64 inputs


class Holder(nn.Module):
    """A bare module holding one block, so PEFT can wrap its experts."""

    def __init__(self, block: SparseMoeBlock):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x)[0]


def random_block(seed: int = 0) -> SparseMoeBlock:
    torch.manual_seed(seed)
    block = SparseMoeBlock(MixtralConfig(**tiny_config(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE)))
    for p in block.parameters():
        nn.init.normal_(p, std=0.2)
    with torch.no_grad():  # expert 3 gets no token (inputs are made positive below): an empty slice
        block.gate.weight[3] = -10.0 * block.gate.weight[:3].abs().sum(0)
    return block


def with_lora(block: SparseMoeBlock, dropout: float, dtype: torch.dtype):
    model = get_peft_model(
        Holder(block), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["w1", "w2", "w3"])
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.3, generator=torch.Generator().manual_seed(hash(name) % 1000))
    return model.to(dtype) if dtype != torch.float32 else model


def build(kind: str, dtype: torch.dtype, dropout: float = 0.0):
    """(model, block): kind = plain | lora | nf4 | qlora | qlora_fp32_adapters, from the same seeded weights."""
    block = random_block()
    if kind in ("nf4", "qlora", "qlora_fp32_adapters"):
        quantize_experts_nf4(block, compute_dtype=dtype)
        block.gate.to(dtype)
    elif dtype != torch.float32:
        block.to(dtype)
    if kind == "qlora_fp32_adapters":  # PEFT's casts around the adapter are not no-ops: unfused path
        return with_lora(block, dropout, torch.float32), block
    if kind in ("lora", "qlora"):
        model = with_lora(block, dropout, torch.float32 if kind == "qlora" else dtype)
        if kind == "qlora":
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.data = p.data.to(dtype)
        return model, block
    return Holder(block), block


def run(kind: str, backend: str, dtype: torch.dtype, dropout: float = 0.0, seed: int = 7):
    model, block = build(kind, dtype, dropout)
    block.expert_backend = backend
    model.train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, HIDDEN, generator=g).abs().to(dtype).requires_grad_()
    upstream = torch.randn(2, 9, HIDDEN, generator=g).to(dtype)
    torch.manual_seed(seed)
    out = model(x)
    (out.float() * upstream.float()).sum().backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach().float(), x.grad.float(), grads, block


def assert_same(actual, expected, tol):
    out, x_grad, grads, _ = actual
    ref_out, ref_x_grad, ref_grads, _ = expected
    assert max_relative_diff(out, ref_out) <= tol
    assert max_relative_diff(x_grad, ref_x_grad) <= tol
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        assert max_relative_diff(grads[name], ref_grads[name]) <= tol, name


CASES = [
    ("plain", 0.0),
    ("lora", 0.0),
    ("lora", 0.25),
    ("nf4", 0.0),
    ("qlora", 0.0),
    ("qlora", 0.25),
]


@pytest.mark.parametrize("backend", GROUPED)
@pytest.mark.parametrize("kind, dropout", CASES)
def test_grouped_equals_per_expert_fp32(kind, dropout, backend):
    reference = run(kind, "per_expert", torch.float32, dropout)
    assert_same(run(kind, backend, torch.float32, dropout), reference, tol=1e-5)
    if kind in ("lora", "qlora"):
        lora_grads = [g for n, g in reference[2].items() if "lora_A" in n or "lora_B" in n]
        # (lora_A, lora_B) x (w1, w2, w3) x experts; every one of the experts given tokens (all but 3) learns
        experts = tiny_config()["num_local_experts"]
        assert len(lora_grads) == 2 * 3 * experts
        assert sum(g.abs().sum() > 0 for g in lora_grads) == 2 * 3 * (experts - 1)
        assert reference[2]["base_model.model.block.experts.3.w1.lora_A.default.weight"].abs().max() == 0


@pytest.mark.parametrize("backend", GROUPED)
@pytest.mark.parametrize(
    "kind, dropout", [("plain", 0.0), ("lora", 0.25), ("qlora", 0.0), ("qlora_fp32_adapters", 0.25)]
)
def test_grouped_equals_per_expert_bf16(kind, dropout, backend):
    reference = run(kind, "per_expert", torch.bfloat16, dropout)
    # bf16 sums in another order differ by a few units in the last place, more on other CPUs' bf16 kernels
    # (docs/reference.md, Tests: what the GPU machine's CPU gave)
    assert_same(run(kind, backend, torch.bfloat16, dropout), reference, tol=3e-2)


def test_transposed_input_gradient_for_cpus_without_native_bf16(monkeypatch):
    """The input gradient through a transposed weight copy (used where bf16 is emulated) is the same."""
    from mixtral_model import grouped_experts

    reference = run("lora", "per_expert", torch.bfloat16, 0.0)
    monkeypatch.setattr(grouped_experts, "_emulated_low_precision_cpu", lambda t: True)
    assert_same(run("lora", "grouped_loop", torch.bfloat16, 0.0), reference, tol=2e-2)


def test_dropout_masks_differ_between_seeds():
    """The dropout test above is not vacuous: another seed gives other LoRA gradients."""
    a, b = (
        run("lora", "grouped_loop", torch.float32, 0.25, seed=7),
        run("lora", "grouped_loop", torch.float32, 0.25, seed=8),
    )
    assert max_relative_diff(a[0], b[0]) > 1e-3


@pytest.mark.parametrize("kind", ["plain", "lora", "nf4", "qlora"])
def test_auto_picks_the_expert_loop_on_cpu(kind, monkeypatch):
    _, block = build(kind, torch.bfloat16)
    experts = list(block.experts.values())
    for native in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: native)
        assert expert_backend_for(experts) == "grouped_loop"


def build_for_loop(kind: str, dtype: torch.dtype, dropout: float):
    """`build`, plus the layouts users train with: a bf16 base under PEFT's default fp32 adapters
    ("lora_fp32_adapters"), and 4-bit experts wrapped by PEFT's bitsandbytes LoRA layer (what PEFT
    picks for a model loaded in 4-bit: "qlora_peft4bit", with bf16 or fp32 adapters)."""
    if kind == "lora_fp32_adapters":
        block = random_block().to(dtype)
        return with_lora(block, dropout, torch.float32), block
    if kind.startswith("qlora_peft4bit"):
        block = random_block()
        quantize_experts_nf4(block, compute_dtype=dtype)
        block.gate.to(dtype)
        holder = Holder(block)
        holder.is_loaded_in_4bit = True  # PEFT then wraps with its bitsandbytes Linear4bit LoRA layer
        model = with_lora_on(holder, dropout)
        if not kind.endswith("fp32_adapters"):
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.data = p.data.to(dtype)
        assert type(block.experts["0"].w1).__module__ == "peft.tuners.lora.bnb"
        return model, block
    return build(kind, dtype, dropout)


def with_lora_on(holder: nn.Module, dropout: float):
    model = get_peft_model(
        holder, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["w1", "w2", "w3"])
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.3, generator=torch.Generator().manual_seed(hash(name) % 1000))
    return model


LOOP_KINDS = [
    "plain",
    "lora",
    "lora_fp32_adapters",
    "nf4",
    "qlora",
    "qlora_peft4bit",
    "qlora_peft4bit_fp32_adapters",
]


@pytest.mark.parametrize(
    "dtype, autocast",
    [(torch.float32, "off"), (torch.bfloat16, "off"), (torch.bfloat16, "cpu"), (torch.bfloat16, "cuda_flag")],
)
@pytest.mark.parametrize("kind", LOOP_KINDS)
def test_expert_loop_is_bitwise_per_expert(kind, dtype, autocast, monkeypatch):
    """The expert loop makes PEFT's numbers in PEFT's order: output, input gradient and every LoRA/base
    gradient equal per_expert's bit for bit on this CPU, dropout on, with and without bf16 autocast.
    "cuda_flag": `torch.is_autocast_enabled()` reports on (as under CUDA autocast), which makes PEFT's
    4-bit layer skip its casts; the loop must follow it."""
    if autocast == "cuda_flag":
        real = torch.is_autocast_enabled
        monkeypatch.setattr(torch, "is_autocast_enabled", lambda *device: real(*device) if device else True)
    from mixtral_model import grouped_experts

    calls = []
    loop = grouped_experts.ExpertLoop.apply
    monkeypatch.setattr(grouped_experts.ExpertLoop, "apply", lambda *a: calls.append(a[4]) or loop(*a))
    results = {}
    for backend in ("per_expert", "grouped_loop"):
        model, block = build_for_loop(kind, dtype, dropout=0.25)
        block.expert_backend = backend
        model.train()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 9, HIDDEN, generator=g).abs().to(dtype).requires_grad_()
        upstream = torch.randn(2, 9, HIDDEN, generator=g).to(dtype)
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast != "off"):
            out = model(x)
            (out.float() * upstream.float()).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results[backend] = out.detach(), x.grad, grads
    assert len(calls) == 1  # the loop ran (not the per-projection fallback)
    (out, x_grad, grads), (ref_out, ref_x_grad, ref_grads) = results["grouped_loop"], results["per_expert"]
    assert torch.equal(out, ref_out) and torch.equal(x_grad, ref_x_grad)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name
    if "lora" in kind:
        assert calls[0].lora_mm == (torch.bfloat16 if autocast != "off" else next(iter(grads.values())).dtype)
    assert calls[0].bnb_skips_casts == (kind.startswith("qlora_peft4bit") and autocast == "cuda_flag")


def test_expert_loop_keeps_less_for_backward_than_per_expert():
    """Saved for backward by one LoRA block (bf16 base, PEFT's fp32 adapters): the loop keeps x, w1(x),
    w3(x) and the adapters' (M, r) products; per_expert's autograd keeps the fp32 casts, silu, the
    product and w2's input besides."""
    saved = {}
    for backend in ("per_expert", "grouped_loop"):
        model, block = build_for_loop("lora_fp32_adapters", torch.bfloat16, 0.0)
        block.expert_backend = backend
        storages = {}

        def pack(t, storages=storages):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        x = torch.randn(2, 9, HIDDEN).abs().to(torch.bfloat16).requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved[backend] = sum(n for ptr, n in storages.items() if ptr not in params)
    assert saved["grouped_loop"] < 0.6 * saved["per_expert"], saved


def saved_tensor_shapes(kind: str, backend: str) -> list[tuple[int, ...]]:
    model, block = build(kind, torch.float32)
    block.expert_backend = backend
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    x = torch.randn(2, 9, HIDDEN).abs().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return shapes


@pytest.mark.parametrize("backend", GROUPED)
def test_quantized_path_keeps_no_dequantized_weight_for_backward(backend):
    weight_shapes = {
        (INTERMEDIATE, HIDDEN),
        (HIDDEN, INTERMEDIATE),
        (4, INTERMEDIATE, HIDDEN),
        (4, HIDDEN, INTERMEDIATE),
    }
    assert weight_shapes & set(saved_tensor_shapes("plain", "per_expert"))  # the probe sees weights
    assert not weight_shapes & set(saved_tensor_shapes("qlora", backend))
    assert not weight_shapes & set(saved_tensor_shapes("lora", backend))  # frozen base: read again


def lora_model(**lora_kwargs):
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**tiny_config()))
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "w1", "w2", "w3"], **lora_kwargs
    )
    return get_peft_model(model, config)


def blocks(model):
    return [layer.block_sparse_moe for layer in model.base_model.model.model.layers]


def backend_of(model) -> str:
    """What the grouped path makes of the first block's experts: 'grouped' or 'per_expert' (unreadable)."""
    return "per_expert" if read_experts(list(blocks(model)[0].experts.values())) is None else "grouped"


def test_unusual_adapters_fall_back_to_per_expert():
    model = lora_model()
    assert backend_of(model) == "grouped"
    with model.disable_adapter():
        assert backend_of(model) == "per_expert"
    model.add_adapter("second", LoraConfig(r=2, target_modules=["w1", "w2", "w3"]))
    model.base_model.set_adapter(["default", "second"])
    assert backend_of(model) == "per_expert"
    model.base_model.set_adapter("default")
    assert backend_of(model) == "grouped"
    model.merge_adapter()
    assert backend_of(model) == "per_expert"
    assert backend_of(lora_model(use_dora=True)) == "per_expert"
    hooked = lora_model()
    blocks(hooked)[0].experts["0"].w1.register_forward_pre_hook(lambda *args: None)
    assert backend_of(hooked) == "per_expert"


def test_forcing_a_grouped_backend_on_unreadable_experts_is_an_error():
    model = lora_model()
    blocks(model)[0].expert_backend = "grouped_loop"
    with model.disable_adapter(), pytest.raises(ValueError, match="'grouped_loop' cannot read these experts"):
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))


def test_lora_model_step_and_saved_adapter(tmp_path):
    """The whole model with LoRA on attention and experts: same loss and LoRA gradients under both
    backends, and the adapter PEFT saves keeps the per-expert hub names."""
    input_ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    results = {}
    for backend in ("per_expert", "grouped_loop"):
        model = lora_model(lora_dropout=0.1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))
        for block in blocks(model):
            block.expert_backend = backend
        model.train()
        torch.manual_seed(3)
        out = model(input_ids=input_ids, labels=input_ids, output_router_logits=True)
        out.loss.backward()
        results[backend] = (
            out.loss.item(),
            {n: p.grad for n, p in model.named_parameters() if p.requires_grad},
        )
    (loss_a, grads_a), (loss_b, grads_b) = results["per_expert"], results["grouped_loop"]
    assert abs(loss_a - loss_b) <= 1e-6 * abs(loss_a)
    for name in grads_a:
        assert max_relative_diff(grads_b[name], grads_a[name]) <= 1e-5, name
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.block_sparse_moe.experts.3.w2.lora_B.weight" in keys
    layers, experts = tiny_config()["num_hidden_layers"], tiny_config()["num_local_experts"]
    expert_adapters = layers * experts * 3 * 2  # (w1, w2, w3) x (lora_A, lora_B)
    assert len([k for k in keys if ".experts." in k]) == expert_adapters


def quantized_weights(shape, quant_type: str, nested: bool, count: int = 3):
    g = torch.Generator().manual_seed(4)
    weights = [torch.randn(shape, generator=g) * 0.2 for _ in range(count)]
    params = [
        bnb.nn.Params4bit(
            w.clone(), requires_grad=False, quant_type=quant_type, compress_statistics=nested
        ).to("cpu")
        for w in weights
    ]
    return weights, params


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape, nested", [((128, 64), True), ((96, 192), False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_4bit_cpu_equals_bitsandbytes(shape, nested, quant_type, dtype):
    _, params = quantized_weights(shape, quant_type, nested)
    ours = _dequantize_4bit_cpu([p.data for p in params], [p.quant_state for p in params], dtype)
    for e, p in enumerate(params):
        expected = bnb.functional.dequantize_4bit(p.data, p.quant_state).to(dtype)
        torch.testing.assert_close(ours[e], expected, rtol=0, atol=0)


def test_dequantize_4bit_cpu_with_fewer_than_64_inputs():
    """Ours stays within NF4's error of the original weight where bitsandbytes 0.50's CPU
    dequantize_4bit does not (in_features 32: 0.46 of the largest weight, measured)."""
    weights, params = quantized_weights((48, 32), "nf4", nested=True)
    ours = _dequantize_4bit_cpu([p.data for p in params], [p.quant_state for p in params], torch.float32)
    for e, w in enumerate(weights):
        assert max_relative_diff(ours[e], w) <= 0.15


def test_train_step_bench_quick_smoke(capsys):
    """bench/train_step.py runs (tiny shapes, one round) and prints ratios against its references."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "train_step.py"
    spec = importlib.util.spec_from_file_location("train_step_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--scenarios", "lora_fp32", "qlora_fp32", "parts_fp32"])
    printed = capsys.readouterr().out
    assert "ours[auto] / transformers+peft" in printed and "ours[auto] / ours[per_expert]" in printed
    assert "output head + loss" in printed


def test_expert_loop_keeps_nothing_past_activation_checkpointing():
    """Under non-reentrant activation checkpointing nothing of the loop outlives the forward: dropout
    masks and the adapters' products go through save_for_backward (checkpointing's hooks drop them and
    recompute in backward), not onto the autograd node."""
    import gc

    from torch.utils.checkpoint import checkpoint

    model, block = build_for_loop("lora_fp32_adapters", torch.bfloat16, dropout=0.25)
    block.expert_backend = "grouped_loop"
    model.train()
    x = torch.randn(2, 9, HIDDEN).abs().to(torch.bfloat16).requires_grad_()
    rows = 2 * 9 * block.top_k
    out = checkpoint(model, x, use_reentrant=False)
    gc.collect()
    alive = [
        tuple(t.shape)
        for t in gc.get_objects()
        if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() == 2 and t.shape[0] == rows
    ]
    assert alive == []  # fp32 (M, .) tensors: the masks (M, 64) and (M, 128), the products (M, 4)
    out.float().sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n and "experts.0." in n)
