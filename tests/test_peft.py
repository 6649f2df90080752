"""LoRA adapters on our experts: trained here, loaded by PEFT onto transformers' Mixtral, same logits."""

import peft
import pytest
import torch
import transformers
from mixtral_reference import model_pair

TARGETS = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "experts": ["w1", "w2", "w3"],
    "both": ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"],
}


def lora_model(model, targets):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[targets], task_type="CAUSAL_LM")
    wrapped = peft.get_peft_model(model, config)
    torch.manual_seed(5)
    for name, param in wrapped.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=1.0)  # trained-looking adapter: B != 0
    return wrapped


def test_lora_wraps_every_expert_and_never_the_router(tmp_path):
    ours, _ = model_pair(tmp_path / "base")
    wrapped = lora_model(ours, "both")
    lora_wrapped = {
        name.removesuffix(".lora_A") for name, _ in wrapped.named_modules() if name.endswith(".lora_A")
    }
    prefix = "base_model.model.model.layers"
    expected_experts = {
        f"{prefix}.{layer}.block_sparse_moe.experts.{expert}.{proj}"
        for layer in range(ours.config.num_hidden_layers)
        for expert in range(ours.config.num_local_experts)
        for proj in ("w1", "w2", "w3")
    }
    assert expected_experts <= lora_wrapped
    assert not any(name.endswith(".gate") for name in lora_wrapped)


@pytest.mark.parametrize("targets", ["attention", "experts", "both"])
def test_adapter_loads_onto_transformers_mixtral_with_same_logits(tmp_path, targets):
    ours, _ = model_pair(tmp_path / "base")
    input_ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = ours(input_ids=input_ids).logits
    wrapped = lora_model(ours, targets)
    wrapped.save_pretrained(tmp_path / "adapter")
    reference_base = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "base")
    reference = peft.PeftModel.from_pretrained(reference_base, tmp_path / "adapter")
    with torch.no_grad():
        ours_logits = wrapped(input_ids=input_ids).logits
        reference_logits = reference(input_ids=input_ids).logits
    adapter_effect = (ours_logits - base_logits).abs().max().item()
    assert adapter_effect > 100 * (1e-5 + 1e-5 * base_logits.abs().max().item()), "adapter had no effect"
    torch.testing.assert_close(ours_logits, reference_logits, rtol=1e-5, atol=1e-5)
