"""MixtralConfig reads hub config.json files (both rope forms) and writes ones transformers reads."""

import json

import pytest
import torch
import transformers
from mixtral_reference import tiny_config

from mixtral_model import MixtralConfig, MixtralForCausalLM
from mixtral_model.flash_attention import check_flash_attention_available

HUB_FIELDS = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "sliding_window",
    "attention_dropout",
    "num_experts_per_tok",
    "num_local_experts",
    "output_router_logits",
    "router_aux_loss_coef",
    "router_jitter_noise",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "rope_parameters",
]

MIXTRAL_8X7B_HUB_CONFIG = {
    "architectures": ["MixtralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1e6,
    "router_aux_loss_coef": 0.02,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 32000,
}


def write_config(directory, config: dict):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_reads_hub_config_with_rope_theta(tmp_path):
    ours = MixtralConfig.from_pretrained(write_config(tmp_path, MIXTRAL_8X7B_HUB_CONFIG))
    ref = transformers.MixtralConfig.from_pretrained(tmp_path)
    hub = MIXTRAL_8X7B_HUB_CONFIG
    assert ours.rope_parameters["rope_theta"] == hub["rope_theta"]
    assert ours.head_dim == hub["hidden_size"] // hub["num_attention_heads"]  # the hub file has no head_dim
    for field in HUB_FIELDS:
        assert getattr(ours, field) == getattr(ref, field) or field == "head_dim", field


def test_reads_rope_parameters_form(tmp_path):
    config = {k: v for k, v in MIXTRAL_8X7B_HUB_CONFIG.items() if k != "rope_theta"}
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
    ours = MixtralConfig.from_pretrained(write_config(tmp_path, config))
    assert ours.rope_parameters["rope_theta"] == 5e5


def test_written_config_loads_in_transformers(tmp_path):
    ours = MixtralConfig(**tiny_config(sliding_window=7, router_jitter_noise=0.01, tie_word_embeddings=True))
    ours.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "mixtral"
    ref = transformers.MixtralConfig.from_pretrained(tmp_path)
    for field in HUB_FIELDS:
        assert getattr(ref, field) == getattr(ours, field), field


def test_tied_embeddings_share_storage(tmp_path):
    model = MixtralForCausalLM(MixtralConfig(**tiny_config(tie_word_embeddings=True)))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_attention_heads=4, num_key_value_heads=3), "multiple of num_key_value_heads"),
        (dict(num_experts_per_tok=5), "num_experts_per_tok=5"),
    ],
)
def test_impossible_shapes_are_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        MixtralConfig(**tiny_config(**overrides))


def flash_attention_usable() -> bool:
    try:
        check_flash_attention_available()
    except ImportError:
        return False
    return True


@pytest.mark.skipif(
    flash_attention_usable(), reason="flash-attn and a CUDA GPU are present: the real path is tested"
)
def test_flash_attention_without_flash_attn_is_a_clear_error():
    with pytest.raises(ImportError, match="flash_attention_2.*sdpa"):
        MixtralForCausalLM._from_config(
            MixtralConfig(**tiny_config()), attn_implementation="flash_attention_2"
        )


@pytest.mark.cuda
@pytest.mark.skipif(not flash_attention_usable(), reason="needs flash-attn >= 2.3 and a CUDA GPU")
def test_flash_attention_matches_sdpa_on_gpu():
    """With flash-attn installed the backend builds and, in bf16 on the GPU, gives sdpa's logits
    (sliding window shorter than the sequence, one padded row)."""
    torch.manual_seed(0)
    config = MixtralConfig(**tiny_config(sliding_window=5, num_attention_heads=4, hidden_size=256))
    sdpa = MixtralForCausalLM._from_config(config, attn_implementation="sdpa").to("cuda", torch.bfloat16)
    flash = MixtralForCausalLM._from_config(config, attn_implementation="flash_attention_2")
    flash.load_state_dict(sdpa.state_dict())
    flash.to("cuda", torch.bfloat16)
    input_ids = torch.randint(0, config.vocab_size, (2, 12), device="cuda")
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    with torch.no_grad():
        expected = sdpa(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        actual = flash(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    real = attention_mask.bool()
    assert (actual[real] - expected[real]).abs().max() <= 2e-2 * expected[real].abs().max()


def test_unknown_attention_backend_is_an_error():
    with pytest.raises(ValueError, match="flex_attention.*not supported"):
        MixtralForCausalLM._from_config(MixtralConfig(**tiny_config()), attn_implementation="flex_attention")
