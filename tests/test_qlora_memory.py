"""Single-GPU QLoRA of Mixtral-8x7B fits 80 GB: mixtral_tune/estimate.py's QLoRA account equals what
bitsandbytes really allocates for a tiny model and the bytes of a tiny QLoRA model's tensors."""

import pytest
import torch
from mixtral_reference import MIXTRAL_8X7B_SHAPE
from transformers import BitsAndBytesConfig

from mixtral_model import MixtralConfig, MixtralForCausalLM
from mixtral_tune.estimate import GIB, estimate_layout, qlora_account, qlora_weight_bytes
from mixtral_tune.memory_measure import layer_parts, saved_bytes_by_module, tensor_account
from mixtral_tune.training.model_factory import NEVER_QUANTIZED

MIXTRAL_8X7B = MixtralConfig(**MIXTRAL_8X7B_SHAPE)


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
    estimate = {part: sum(split.values()) for part, split in qlora_weight_bytes(config).items()}
    assert quantized.get_memory_footprint() == estimate["nf4_weights"] + estimate["unquantized"]


def mixtral_parameter_count(c: MixtralConfig) -> int:
    kv = c.num_key_value_heads * c.head_dim
    attention = c.hidden_size * (2 * c.hidden_size + 2 * kv)
    experts = c.num_local_experts * 3 * c.hidden_size * c.intermediate_size
    router_and_norms = c.num_local_experts * c.hidden_size + 2 * c.hidden_size
    layers = c.num_hidden_layers * (attention + experts + router_and_norms)
    return 2 * c.vocab_size * c.hidden_size + layers + c.hidden_size


def single_gpu_qlora(tokens: int):
    return estimate_layout(
        MIXTRAL_8X7B, world_size=1, zero_stage=0, peft="qlora", lora_r=16, lora_targets="both", seq_len=tokens
    )


def test_mixtral_8x7b_qlora_fits_one_80gb_gpu(capsys):
    quantized_values = (
        mixtral_parameter_count(MIXTRAL_8X7B) - 2 * 32000 * 4096 - 32 * (8 * 4096 + 2 * 4096) - 4096
    )
    estimate = single_gpu_qlora(4096)
    with capsys.disabled():
        print(
            f"\nMixtral-8x7B: {mixtral_parameter_count(MIXTRAL_8X7B) / 1e9:.2f}B parameters; QLoRA "
            "(NF4 + double quant, LoRA r=16 on attention+experts, 4096 tokens per micro-batch):"
        )
        print(estimate.table())
    assert qlora_weight_bytes(MIXTRAL_8X7B)["nf4_weights"] == {
        "dense": 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024) // 2,
        "experts": 32 * 8 * 3 * 4096 * 14336 // 2,
    }
    assert sum(qlora_weight_bytes(MIXTRAL_8X7B)["nf4_weights"].values()) == quantized_values / 2
    assert estimate.memory_total < 80 * 0.75 * GIB, (
        "must leave room for the CUDA context, allocator slack and longer batches"
    )


@pytest.mark.parametrize("tokens", [2048, 8192])
def test_activation_estimate_grows_linearly_with_tokens(tokens):
    """Linear in the tokens (sdpa/flash attention), plus per-layer constants (autocast's adapter weight copies)."""
    a = [single_gpu_qlora(t * tokens).memory["activations"] for t in (1, 2, 3)]
    assert a[2] - a[1] == a[1] - a[0] > 0


def tiny_qlora(prepare=None, optimizer_name="adamw"):
    """A tiny model built as the factory builds a QLoRA run (NF4 with double quantization, bf16
    storage, LoRA on attention and experts), one training step taken."""
    from omegaconf import OmegaConf

    from mixtral_tune.training.model_factory import apply_peft, quantization_config

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, output_router_logits=True,
    )  # fmt: skip
    cfg = OmegaConf.create({"peft": {
        "method": "qlora", "r": 8, "alpha": 16, "dropout": 0.0, "targets": "both", "train_router": False,
        "esft_selection": None,
        "quant": {"quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16",
                  "quant_storage": "bfloat16"},
    }})  # fmt: skip
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        MixtralForCausalLM(config).save_pretrained(tmp)
        model = MixtralForCausalLM.from_pretrained(
            tmp, dtype=torch.bfloat16, quantization_config=quantization_config(cfg)
        )
    if prepare is not None:
        prepare(model)
    model = apply_peft(model, cfg, gradient_checkpointing=False)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    ids = torch.randint(0, config.vocab_size, (1, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return config, model, optimizer, ids


def test_account_components_equal_the_tensor_bytes_of_a_tiny_qlora_model():
    config, model, optimizer, _ = tiny_qlora()
    measured = tensor_account(model, optimizer)
    expected = qlora_account(config, r=8, targets="both", unquantized_bytes=2)
    assert measured == expected
    assert all(v > 0 for v in measured.values())


def test_factory_keeps_unquantized_weights_bf16_and_saves_fewer_activation_bytes_than_peft_upcast():
    """PEFT's prepare_model_for_kbit_training makes embeddings/lm_head/norms fp32 and with them the
    activations; the factory's preparation keeps them bf16. Same model, same batch, bytes saved for
    backward per part counted with saved-tensor hooks."""
    import peft

    def upcast(model):
        peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

    results = {}
    for name, prepare in (("factory", None), ("peft_upcast", upcast)):
        config, model, optimizer, ids = tiny_qlora(prepare)
        unquantized = {
            p.dtype for p in model.parameters() if type(p).__name__ != "Params4bit" and not p.requires_grad
        }
        account = tensor_account(model, optimizer)
        with saved_bytes_by_module(model, layer_parts(model)) as saved:
            model(input_ids=ids, labels=ids).loss.backward()
        buffers = sum(b.nbytes for b in model.buffers())  # the rotary frequencies stay fp32 in both
        results[name] = unquantized, {**account, "unquantized": account["unquantized"] - buffers}, saved
    (f_dtypes, f_account, f_saved), (u_dtypes, u_account, u_saved) = (
        results["factory"],
        results["peft_upcast"],
    )
    assert f_dtypes == {torch.bfloat16} and u_dtypes == {torch.float32}
    assert u_account["unquantized"] == 2 * f_account["unquantized"]
    assert set(f_saved) >= {"layer0.attention", "layer0.moe", "layer1.moe", "other"}
    for part in ("layer0.moe", "layer1.moe"):
        assert 0 < f_saved[part] < u_saved[part], (part, f_saved[part], u_saved[part])
    assert sum(f_saved.values()) < sum(u_saved.values())


def test_saved_bytes_by_module_counts_what_autograd_saves():
    lin = torch.nn.Linear(8, 16)
    x = torch.randn(4, 8, requires_grad=True)
    with saved_bytes_by_module(lin, {"lin": lin}) as saved:
        torch.relu(lin(x)).sum().backward()
    # Linear saves its input (4x8 fp32; its weight is a parameter, not counted); relu its output (4x16)
    assert saved == {"lin": 4 * 8 * 4, "other": 4 * 16 * 4}
