"""Shared helpers for tests that hold our model against transformers' MixtralForCausalLM."""

import torch
import transformers
from omegaconf import OmegaConf

from mixtral_model import MixtralConfig, MixtralForCausalLM
from mixtral_tune.shipped import CONFIG_DIR

# Mixtral-8x7B's shape as shipped (configs/model/mixtral-8x7b.yaml): tests that count its parameters and
# bytes count what the recipes build
MIXTRAL_8X7B_SHAPE = OmegaConf.to_container(
    OmegaConf.load(CONFIG_DIR / "model" / "mixtral-8x7b.yaml").architecture
)

TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=256,
    rope_theta=10000.0,
    router_aux_loss_coef=0.02,
)


def tiny_config(**overrides) -> dict:
    return {**TINY, **overrides}


def model_pair(tmp_path, attn_implementation="eager", seed=0, **overrides):
    """Our model with random weights, and transformers' model loaded from our saved checkpoint."""
    torch.manual_seed(seed)
    ours = MixtralForCausalLM(MixtralConfig(**tiny_config(**overrides)))
    ours.config._attn_implementation = attn_implementation
    ours.save_pretrained(tmp_path)
    ref = transformers.MixtralForCausalLM.from_pretrained(tmp_path, attn_implementation=attn_implementation)
    return ours, ref


def reference_grad(ref, name: str, intermediate_size: int) -> torch.Tensor:
    """The gradient in transformers' fused-expert layout that corresponds to our parameter `name`."""
    if ".block_sparse_moe.experts." not in name:
        return ref.get_parameter(name.replace(".block_sparse_moe.", ".mlp.")).grad
    prefix, rest = name.split(".block_sparse_moe.experts.")
    expert, proj, _ = rest.split(".")
    experts = ref.get_submodule(prefix + ".mlp.experts")
    e = int(expert)
    if proj == "w2":
        return experts.down_proj.grad[e]
    gate_up = experts.gate_up_proj.grad[e]
    return gate_up[:intermediate_size] if proj == "w1" else gate_up[intermediate_size:]
