"""Single-GPU QLoRA of Mixtral-8x7B fits 80 GB: the estimate counts the real module tree, and its
base-weight part equals what bitsandbytes really allocates for a tiny model."""

import pytest
import torch
from transformers import BitsAndBytesConfig

from mixtral_model import MixtralConfig, MixtralForCausalLM
from train.config import LORA_TARGET_MODULES
from train.memory import GB, base_weight_bytes, qlora_memory
from train.model_factory import NEVER_QUANTIZED

MIXTRAL_8X7B = MixtralConfig(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    num_local_experts=8,
    num_experts_per_tok=2,
    rope_theta=1e6,
)


def test_base_weight_count_matches_bitsandbytes(tmp_path):
    config = MixtralConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
    )  # fmt: skip
    MixtralForCausalLM(config).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
        llm_int8_skip_modules=NEVER_QUANTIZED,
    )
    quantized = MixtralForCausalLM.from_pretrained(tmp_path, quantization_config=quant, dtype=torch.bfloat16)
    estimate = base_weight_bytes(MixtralForCausalLM(config))
    assert quantized.get_memory_footprint() == estimate["nf4_weights"] + estimate["unquantized"]


def mixtral_parameter_count(c: MixtralConfig) -> int:
    kv = c.num_key_value_heads * c.head_dim
    attention = c.hidden_size * (2 * c.hidden_size + 2 * kv)
    experts = c.num_local_experts * 3 * c.hidden_size * c.intermediate_size
    router_and_norms = c.num_local_experts * c.hidden_size + 2 * c.hidden_size
    layers = c.num_hidden_layers * (attention + experts + router_and_norms)
    return 2 * c.vocab_size * c.hidden_size + layers + c.hidden_size


def test_mixtral_8x7b_qlora_fits_one_80gb_gpu(capsys):
    quantized_values = (
        mixtral_parameter_count(MIXTRAL_8X7B) - 2 * 32000 * 4096 - 32 * (8 * 4096 + 2 * 4096) - 4096
    )
    report = qlora_memory(MIXTRAL_8X7B, r=16, targets=LORA_TARGET_MODULES["both"], tokens=4096)
    with capsys.disabled():
        print(
            f"\nMixtral-8x7B: {mixtral_parameter_count(MIXTRAL_8X7B) / 1e9:.2f}B parameters; QLoRA "
            "(NF4 + double quant, LoRA r=16 on attention+experts, 4096 tokens per micro-batch):"
        )
        for part, gb in report.items():
            print(f"  {part:>18}: {gb:6.2f} GB")
    assert report["nf4_weights"] * GB == quantized_values / 2
    assert report["total"] < 80 * 0.75, (
        "must leave room for the CUDA context, allocator slack and longer batches"
    )


@pytest.mark.parametrize("tokens", [2048, 8192])
def test_activation_estimate_grows_with_tokens(tokens):
    small = qlora_memory(MIXTRAL_8X7B, r=16, targets=["q_proj"], tokens=tokens)
    large = qlora_memory(MIXTRAL_8X7B, r=16, targets=["q_proj"], tokens=2 * tokens)
    assert large["activations"] == pytest.approx(2 * small["activations"])
