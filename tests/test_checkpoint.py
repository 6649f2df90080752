"""Hub-layout checkpoints both ways (single file and sharded), and clear errors for bad ones."""

import json

import pytest
import torch
import transformers
from mixtral_reference import tiny_config
from safetensors.torch import load_file, save_file

from mixtral_model import CheckpointError, MixtralConfig, MixtralForCausalLM

HUB_KEYS_LAYER0 = {
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.block_sparse_moe.gate.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
} | {f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight" for e in range(4) for w in ("w1", "w2", "w3")}


def logits(model, seed=0):
    input_ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids).logits


def saved_keys(directory) -> set[str]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return set(json.loads(index.read_text())["weight_map"])
    return set(load_file(directory / "model.safetensors"))


@pytest.fixture
def ours():
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(**tiny_config()))


@pytest.mark.parametrize("shard", [None, "40KB"], ids=["single", "sharded"])
def test_ours_to_transformers(tmp_path, ours, shard):
    kwargs = {"max_shard_size": shard} if shard else {}
    ours.save_pretrained(tmp_path, **kwargs)
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(shard)
    keys = saved_keys(tmp_path)
    assert HUB_KEYS_LAYER0 <= keys
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= keys
    assert not any(".mlp." in key or "gate_up_proj" in key for key in keys)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "mixtral"
    ref = transformers.MixtralForCausalLM.from_pretrained(tmp_path)
    assert ref.config.rope_parameters["rope_theta"] == tiny_config()["rope_theta"]
    torch.testing.assert_close(logits(ours), logits(ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shard", [None, "40KB"], ids=["single", "sharded"])
def test_transformers_to_ours(tmp_path, shard):
    torch.manual_seed(1)
    ref = transformers.MixtralForCausalLM(transformers.MixtralConfig(**tiny_config()))
    ref.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert HUB_KEYS_LAYER0 <= saved_keys(tmp_path)
    loaded = MixtralForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(loaded), logits(ref), rtol=1e-5, atol=1e-6)
    assert set(loaded.state_dict()) == saved_keys(tmp_path)


def test_hub_config_with_rope_theta_key(tmp_path, ours):
    """Hub config.json files of Mixtral-8x7B carry `rope_theta` at top level (pre-transformers-5)."""
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_parameters")
    config["rope_theta"] = 1e6
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = MixtralForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.rope_parameters["rope_theta"] == 1e6
    ref = transformers.MixtralForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(loaded), logits(ref), rtol=1e-5, atol=1e-6)


def test_save_load_roundtrip_is_exact(tmp_path, ours):
    ours.save_pretrained(tmp_path, max_shard_size="40KB")
    loaded = MixtralForCausalLM.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(ours.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def rewrite_checkpoint(directory, edit):
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_missing_key_is_an_error(tmp_path, ours):
    ours.save_pretrained(tmp_path)
    rewrite_checkpoint(tmp_path, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"))
    with pytest.raises(
        CheckpointError, match=r"missing keys: model\.layers\.1\.block_sparse_moe\.experts\.2\.w3"
    ):
        MixtralForCausalLM.from_pretrained(tmp_path)


def test_unexpected_key_is_an_error(tmp_path, ours):
    ours.save_pretrained(tmp_path)
    rewrite_checkpoint(tmp_path, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys: model\.layers\.0\.extra\.weight"):
        MixtralForCausalLM.from_pretrained(tmp_path)


def test_wrong_shape_is_an_error(tmp_path, ours):
    ours.save_pretrained(tmp_path)
    rewrite_checkpoint(
        tmp_path, lambda t: t.update({"model.layers.0.block_sparse_moe.gate.weight": torch.zeros(5, 64)})
    )
    with pytest.raises(
        CheckpointError,
        match=r"wrongly shaped keys: model\.layers\.0\.block_sparse_moe\.gate\.weight \(5, 64\)",
    ):
        MixtralForCausalLM.from_pretrained(tmp_path)


def test_garbage_file_is_an_error(tmp_path, ours):
    ours.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        MixtralForCausalLM.from_pretrained(tmp_path)


def test_missing_directory_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        MixtralForCausalLM.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MixtralForCausalLM.from_pretrained(str(tmp_path / "nowhere"))
