"""GPU memory of a single-GPU QLoRA run, counted on the real module tree built on the meta device.

- base weights: every nn.Linear except the router and lm_head is NF4 (bitsandbytes packs two 4-bit
  values per byte; with double quantization each 64-value block keeps a uint8 absmax and each 256
  blocks an fp32 one); everything else stays in the compute dtype;
- LoRA: A (r x in) and B (out x r) per targeted Linear, trained in fp32 with AdamW: parameter,
  gradient and two moment buffers, 16 bytes per value;
- activations with gradient checkpointing: each layer's input kept for the backward pass, one layer's
  working set rematerialised at a time (attention projections, the top-k expert intermediates, and
  the fp32 logits with their gradient).

`qlora_account` splits a QLoRA run's persistent bytes into components from the config alone (what
Mixtral-8x7B needs, computed on a CPU); `tensor_account` sorts the bytes of a real model's tensors
(and its optimizer's state) into the same components, and `saved_bytes_by_module` sums what a forward
pass saves for backward, per decoder-layer part, with saved-tensor hooks. tests/test_qlora_memory.py
holds the first to the second on a tiny QLoRA model; bench/gpu_check.py prints all three next to the
GPU's measured peak.
"""

import contextlib
import math

import torch
from torch import nn

from mixtral_model import MixtralConfig, MixtralForCausalLM
from mixtral_tune.training.model_factory import NEVER_QUANTIZED

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


# per quantized Linear: the NF4 code table (16 fp32), the nested quantization's code table (256 fp32)
# and its offset (one fp32)
NF4_TABLES = 4 * (16 + 256 + 1)
# optimizer state bytes per trained value: torch AdamW keeps two fp32 moments; bitsandbytes' 8-bit
# AdamW two uint8 moments plus one fp32 absmax per 256-value block and moment (tensors of at least
# 4096 values, as LoRA matrices of real models are)
OPTIMIZER_STATE_BYTES = {"adamw": 8.0, "adamw_8bit": 2.0 + 2 * 4 / 256}


def qlora_account(
    config: MixtralConfig,
    r: int,
    targets: list[str],
    unquantized_bytes: int = 2,
    optimizer: str = "adamw",
) -> dict[str, int]:
    """Persistent bytes of a QLoRA run by component: NF4 weights, their constants, the unquantized
    weights (embeddings, lm_head, norms, routers: `unquantized_bytes` each, 4 after PEFT's fp32 upcast),
    fp32 LoRA parameters, their gradients and the optimizer's state."""
    model = meta_model(config)
    weights = base_weight_bytes(model, compute_bytes=unquantized_bytes)
    quantized = sum(1 for name, module in model.named_modules() if is_quantized(name, module))
    lora = lora_values(model, r, targets)
    return {
        "nf4_weights": weights["nf4_weights"],
        "nf4_constants": weights["nf4_constants"] + NF4_TABLES * quantized,
        "unquantized": weights["unquantized"],
        "lora_params": 4 * lora,
        "lora_grads": 4 * lora,
        "optimizer_state": round(OPTIMIZER_STATE_BYTES[optimizer] * lora),
    }


def _quant_state_tensors(state) -> list[torch.Tensor]:
    tensors = [state.absmax, state.code]
    if getattr(state, "nested", False):
        tensors += [state.state2.absmax, state.state2.code, state.offset]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def tensor_account(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """The bytes of a real model's tensors in `qlora_account`'s components (each storage counted once)."""
    seen: set[tuple[int, int]] = set()
    parts = dict.fromkeys(("nf4_weights", "nf4_constants", "unquantized", "lora_params", "lora_grads",
                           "optimizer_state"), 0)  # fmt: skip

    def add(part: str, t: torch.Tensor) -> None:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            parts[part] += t.untyped_storage().nbytes()

    for p in model.parameters():
        if type(p).__name__ == "Params4bit":
            add("nf4_weights", p)
            for t in _quant_state_tensors(p.quant_state):
                add("nf4_constants", t)
        elif p.requires_grad:
            add("lora_params", p)
            if p.grad is not None:
                add("lora_grads", p.grad)
        else:
            add("unquantized", p)
    for b in model.buffers():
        add("unquantized", b)
    if optimizer is not None:
        for state in optimizer.state.values():
            for t in state.values():
                if isinstance(t, torch.Tensor) and t.dim() > 0:
                    add("optimizer_state", t)
    return parts


@contextlib.contextmanager
def saved_bytes_by_module(model: nn.Module, parts: dict[str, nn.Module]):
    """Sum the bytes saved for backward during the forward passes run inside, per named part (the
    innermost part whose forward is running; "other" outside them). Parameters are not counted (they
    are resident anyway); each storage counts once. Yields the dict of totals, filled on exit. Run it
    with gradient checkpointing off: checkpointing replaces these hooks inside the layers."""
    totals: dict[str, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters() if p.device.type != "meta"}
    stack = ["other"]
    kept = []  # the saved tensors, held so their storages are not reused (and miscounted) meanwhile
    seen: set[int] = set()

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            kept.append(t)
            totals[stack[-1]] = totals.get(stack[-1], 0) + t.untyped_storage().nbytes()
        return t

    def enter(name: str):
        def hook(module, args) -> None:
            stack.append(name)

        return hook

    def leave(module, args, output) -> None:
        stack.pop()

    handles = []
    for name, module in parts.items():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield totals
    finally:
        for handle in handles:
            handle.remove()
        kept.clear()


def layer_parts(model: nn.Module) -> dict[str, nn.Module]:
    """Named parts for `saved_bytes_by_module`: each decoder layer (what its parts below do not save:
    none so far) and its norms, attention and MoE block, the final norm and lm_head; the loss on the
    logits counts as "other". Works on our model and on PEFT's wrapper of it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parts = {"embed_tokens": base.model.embed_tokens, "final_norm": base.model.norm, "lm_head": base.lm_head}
    for i, layer in enumerate(base.model.layers):
        parts |= {
            f"layer{i}": layer,
            f"layer{i}.input_norm": layer.input_layernorm,
            f"layer{i}.attention": layer.self_attn,
            f"layer{i}.post_attention_norm": layer.post_attention_layernorm,
            f"layer{i}.moe": layer.block_sparse_moe,
        }
    return parts


def qlora_memory(config: MixtralConfig, r: int, targets: list[str], tokens: int) -> dict[str, float]:
    """GB per part and in total for one micro-batch of `tokens` tokens."""
    model = meta_model(config)
    parts = base_weight_bytes(model)
    parts["lora_train_state"] = 16 * lora_values(model, r, targets)
    parts["activations"] = activation_bytes(config, tokens)
    report = {name: size / GB for name, size in parts.items()}
    report["total"] = sum(parts.values()) / GB
    return report
