"""Measuring tools for memory: what a real model's tensors and a real forward pass hold. The memory
model itself (formulas from the config) is mixtral_tune/estimate.py; tests/test_qlora_memory.py and
tests/test_estimate.py hold it to these measurements, and bench/gpu_check prints both on a GPU.

- `tensor_account`: the bytes of a model's tensors (and its optimizer's state) sorted into the
  components of `estimate.qlora_account` (NF4 weights, their constants, unquantized weights, LoRA
  parameters, gradients, optimizer state);
- `saved_bytes_by_module` with `layer_parts`: the bytes a forward pass saves for backward, per decoder
  layer part, counted with saved-tensor hooks.
"""

import contextlib

import torch
from torch import nn


def _quant_state_tensors(state) -> list[torch.Tensor]:
    tensors = [state.absmax, state.code]
    if getattr(state, "nested", False):
        tensors += [state.state2.absmax, state.state2.code, state.offset]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def tensor_account(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """The bytes of a real model's tensors in `estimate.qlora_account`'s components (each storage counted once)."""
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
