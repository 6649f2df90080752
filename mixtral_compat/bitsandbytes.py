"""Every use of bitsandbytes internals (private or undocumented names) in this project, in one place.

CHECKED is the range of bitsandbytes versions these were checked against; `mixtral_compat.check_versions()`
refuses others at start-up with one line. Code elsewhere calls the functions here, never the
internals themselves.

- `compute_dtype`: `Linear4bit` picks its compute dtype from its first input (`set_compute_type`,
  `compute_type_is_set`); the grouped expert kernels, which never call the module, do the same.
- `quant_state`: `bitsandbytes.nn.modules.fix_4bit_weight_quant_state_from_module` (a weight whose
  quant state lives on the module, as after ZeRO-3 re-gathers it) and whether the weight was repacked
  into the CPU inference layout (`QuantState.packing_format_for_cpu`).
- `keep_4bit_training_layout`: `Linear4bit.support_avx512bf16_for_cpu`, which lets an eval-mode forward
  on a CPU with AVX512-BF16 repack the weight in place.
"""

import torch
from torch import nn

PACKAGE = "bitsandbytes"
CHECKED = ">=0.50,<0.51"


def linear4bit_class() -> type | None:
    """bitsandbytes.nn.Linear4bit, or None without bitsandbytes."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    return bnb.nn.Linear4bit


def compute_dtype(layer: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The compute dtype a `Linear4bit` uses for input x (set from x on first use, as its forward does)."""
    if not layer.compute_type_is_set:
        layer.set_compute_type(x)
        layer.compute_type_is_set = True
    return layer.compute_dtype or x.dtype


def quant_state(layer: nn.Module):
    """The weight's QuantState, restored from the module first when the weight lost it."""
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    fix_4bit_weight_quant_state_from_module(layer)
    return layer.weight.quant_state


def readable_quant_state(layer: nn.Module) -> bool:
    """A 4-bit layer whose weight has a quant state and is in its training layout (not CPU-packed)."""
    state = getattr(layer.weight, "quant_state", None) or getattr(layer, "quant_state", None)
    return state is not None and not getattr(state, "packing_format_for_cpu", False)


def keep_4bit_training_layout(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout.

    On a CPU with AVX512-BF16, a `Linear4bit` run in eval mode (the trainer's evaluation) rewrites its
    weight in place into a uint8 tiled layout and changes its quant state. Under ZeRO-3 the weight's
    storage is DeepSpeed's partition (bf16 quant storage): the next gather hands back the original
    layout, which the packed quant state misreads, and the checkpoint save asserts uint8 storage.
    A model being trained keeps the layout it was quantized in.
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if layers and not hasattr(layers[0], "support_avx512bf16_for_cpu"):
        raise RuntimeError(
            f"bitsandbytes {bnb.__version__}: Linear4bit has no support_avx512bf16_for_cpu switch any more; "
            f"mixtral_compat/bitsandbytes.py is written for {PACKAGE}{CHECKED}"
        )
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
