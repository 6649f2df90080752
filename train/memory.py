"""GPU memory of a single-GPU QLoRA run, counted on the real module tree built on the meta device.

- base weights: every nn.Linear except the router and lm_head is NF4 (bitsandbytes packs two 4-bit
  values per byte; with double quantization each 64-value block keeps a uint8 absmax and each 256
  blocks an fp32 one); everything else stays in the compute dtype;
- LoRA: A (r x in) and B (out x r) per targeted Linear, trained in fp32 with AdamW: parameter,
  gradient and two moment buffers, 16 bytes per value;
- activations with gradient checkpointing: each layer's input kept for the backward pass, one layer's
  working set rematerialised at a time (attention projections, the top-k expert intermediates, and
  the fp32 logits with their gradient).
"""

import math

import torch
from torch import nn

from mixtral_model import MixtralConfig, MixtralForCausalLM
from train.model_factory import NEVER_QUANTIZED

GB = 1024**3
NF4_BLOCK, NESTED_BLOCK = 64, 256


def nf4_bytes(numel: int) -> int:
    blocks = math.ceil(numel / NF4_BLOCK)
    return numel // 2 + blocks + 4 * math.ceil(blocks / NESTED_BLOCK)


def meta_model(config: MixtralConfig) -> MixtralForCausalLM:
    with torch.device("meta"):
        return MixtralForCausalLM(config)


def is_quantized(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in NEVER_QUANTIZED


def base_weight_bytes(model: nn.Module, compute_bytes: int = 2) -> dict[str, int]:
    """Packed NF4 weights, their quantization constants, and the unquantized rest."""
    packed = constants = 0
    quantized_params = set()
    for name, module in model.named_modules():
        if is_quantized(name, module):
            numel = module.weight.numel()
            packed += numel // 2
            constants += nf4_bytes(numel) - numel // 2
            quantized_params.add(id(module.weight))
    rest = sum(p.numel() for p in model.parameters() if id(p) not in quantized_params) * compute_bytes
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return {"nf4_weights": packed, "nf4_constants": constants, "unquantized": rest + buffers}


def lora_values(model: nn.Module, r: int, targets: list[str]) -> int:
    return sum(
        r * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    )


def activation_bytes(config: MixtralConfig, tokens: int, compute_bytes: int = 2) -> int:
    d, f, k = config.hidden_size, config.intermediate_size, config.num_experts_per_tok
    kv = config.num_key_value_heads * config.head_dim
    checkpoints = config.num_hidden_layers * tokens * d * compute_bytes
    attention = tokens * (4 * d + 2 * kv) * compute_bytes
    experts = tokens * k * (3 * f + 2 * d) * compute_bytes
    logits = tokens * config.vocab_size * 4 * 2
    return checkpoints + attention + experts + logits


def qlora_memory(config: MixtralConfig, r: int, targets: list[str], tokens: int) -> dict[str, float]:
    """GB per part and in total for one micro-batch of `tokens` tokens."""
    model = meta_model(config)
    parts = base_weight_bytes(model)
    parts["lora_train_state"] = 16 * lora_values(model, r, targets)
    parts["activations"] = activation_bytes(config, tokens)
    report = {name: size / GB for name, size in parts.items()}
    report["total"] = sum(parts.values()) / GB
    return report
