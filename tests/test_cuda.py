"""The GPU paths, cheaply (marked `cuda`: skipped with a reason without a CUDA GPU, run on one):
the expert loop (grouped_loop) against per_expert in bf16, and a QLoRA model built by the factory's
path (bitsandbytes NF4 on the GPU, the factory's 4-bit preparation and LoRA) training, its expert loop
held to per_expert and its memory account to the bytes of its real tensors. flash-attn against sdpa is
tests/test_model_config.py::test_flash_attention_matches_sdpa_on_gpu (when flash-attn is installed)."""

import pytest
import torch
from mixtral_reference import tiny_config

from mixtral_model import MixtralConfig, MixtralForCausalLM
from mixtral_model.moe import SparseMoeBlock
from mixtral_model.testing import max_relative_diff

pytestmark = pytest.mark.cuda


def moe_fwd_bwd(block: SparseMoeBlock, backend: str, x: torch.Tensor, upstream: torch.Tensor) -> dict:
    block.expert_backend = backend
    block.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out, _ = block(x)
    (out.float() * upstream).sum().backward()
    return {"out": out.detach(), "dx": x.grad, **{n: p.grad for n, p in block.named_parameters()}}


def test_expert_loop_matches_per_expert_in_bf16_on_cuda():
    torch.manual_seed(0)
    config = MixtralConfig(**tiny_config(hidden_size=256, intermediate_size=512, num_local_experts=8))
    with torch.device("cuda"):
        block = SparseMoeBlock(config).to(torch.bfloat16)
        for p in block.parameters():
            torch.nn.init.normal_(p, std=0.05)
        x = torch.randn(2, 128, 256, dtype=torch.bfloat16)
        upstream = torch.randn(2, 128, 256)
    reference = moe_fwd_bwd(block, "per_expert", x, upstream)
    grouped = moe_fwd_bwd(block, "grouped_loop", x, upstream)
    assert reference.keys() == grouped.keys()
    for name in reference:
        assert max_relative_diff(grouped[name].float(), reference[name].float()) <= 2e-2, name


def test_qlora_trains_on_cuda_and_its_account_equals_its_tensors(tmp_path):
    from omegaconf import OmegaConf

    from mixtral_tune.estimate import qlora_account
    from mixtral_tune.memory_measure import tensor_account
    from mixtral_tune.training.model_factory import apply_peft, quantization_config

    torch.manual_seed(0)
    config = MixtralConfig(**tiny_config(hidden_size=128, intermediate_size=256, output_router_logits=True))
    MixtralForCausalLM(config).save_pretrained(tmp_path)
    cfg = OmegaConf.create({"peft": {
        "method": "qlora", "r": 8, "alpha": 16, "dropout": 0.0, "targets": "both", "train_router": False, "esft_selection": None,
        "quant": {"quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16",
                  "quant_storage": "bfloat16"},
    }})  # fmt: skip
    model = MixtralForCausalLM.from_pretrained(
        tmp_path, dtype=torch.bfloat16, quantization_config=quantization_config(cfg), device_map={"": 0}
    )
    model = apply_peft(model, cfg, gradient_checkpointing=True)
    expert_w1 = [p for n, p in model.named_parameters() if ".w1." in n and "lora_" not in n]
    assert expert_w1 and all(p.is_cuda for p in expert_w1)
    ids = torch.randint(0, config.vocab_size, (2, 64), device="cuda")

    def loss_and_grads(backend: str):
        for block in model.modules():
            if isinstance(block, SparseMoeBlock):
                block.expert_backend = backend
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    ref_loss, ref_grads = loss_and_grads("per_expert")
    # `auto` picks per_expert on CUDA: hold the expert loop to it (bit for bit on CPU; at tolerance here).
    for backend in ["grouped_loop"]:
        loss, grads = loss_and_grads(backend)
        assert torch.isfinite(loss) and grads.keys() == ref_grads.keys() and len(grads) > 0
        assert max_relative_diff(loss.float(), ref_loss.float()) <= 1e-2, backend
        for name in grads:
            assert max_relative_diff(grads[name], ref_grads[name]) <= 5e-2, (backend, name)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    optimizer.step()
    assert tensor_account(model, optimizer) == qlora_account(config, r=8, targets="both", unquantized_bytes=2)
