"""Every use of PEFT internals (private or undocumented names) in this project, in one place.

CHECKED is the range of peft versions these were checked against; `mixtral_compat.check_versions()`
refuses others at start-up with one line. Code elsewhere calls the functions here, never the
internals themselves.

1. `lora_layer_kind` / `vanilla_lora_parts`: the grouped expert kernels (mixtral_model/grouped_experts.py)
   compute PEFT's LoRA `Linear.forward` themselves, so they read a LoRA layer's parts: its classes
   (`peft.tuners.lora.layer.Linear`, `peft.tuners.lora.bnb.Linear4bit`), `base_layer`, `lora_A`/`lora_B`/
   `lora_dropout`/`scaling` per adapter, `merged`, `disable_adapters`, `active_adapters`, `use_dora`,
   `lora_variant` and `cast_input_dtype_enabled`.

2. `skip_peft_target_rewrite_for_native_mixtral`: keep PEFT from re-targeting LoRA on our experts.

PEFT (>= 0.18, with transformers 5) rewrites the LoRA targets of every model whose config says
`model_type: mixtral`: `w1`/`w3`/`w2` become the fused 3-D `gate_up_proj`/`down_proj` parameters
of transformers' own Mixtral. Our experts are real `nn.Linear` modules named `w1`/`w2`/`w3` (the hub
layout), so for our model that rewrite targets parameters that do not exist. This module wraps
PEFT's rewrite so it skips our model and still applies to transformers' Mixtral — which is what
lets an adapter trained here load onto `transformers.MixtralForCausalLM` through
`peft.PeftModel.from_pretrained` (PEFT converts our per-expert adapter to the fused layout).
"""

import functools
from dataclasses import dataclass

from torch import nn

from mixtral_compat.torch import has_hooks

PACKAGE = "peft"
CHECKED = ">=0.21.2,<0.22"
SUPPORTED = f"{PACKAGE}{CHECKED}"


def _is_native_mixtral(model) -> bool:
    from mixtral_model.model import MixtralPreTrainedModel

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return isinstance(base, MixtralPreTrainedModel)


def skip_peft_target_rewrite_for_native_mixtral() -> None:
    """Idempotent: wrap peft's `convert_peft_config_for_transformers` to leave our model's targets alone.

    PEFT's BaseTuner.inject_adapter imports that function from its module at each call, so the module
    attribute is what it runs. A PEFT without it raises here rather than training LoRA on the wrong
    targets.
    """
    import peft

    try:
        from peft.tuners import tuners_utils
        from peft.utils import transformers_weight_conversion as conversion

        original = conversion.convert_peft_config_for_transformers
    except (ImportError, AttributeError) as error:
        raise ImportError(
            f"peft {peft.__version__} has no peft.utils.transformers_weight_conversion."
            f"convert_peft_config_for_transformers to wrap; mixtral_compat/peft.py is written for {SUPPORTED}"
        ) from error
    if hasattr(tuners_utils, "convert_peft_config_for_transformers"):
        raise ImportError(
            f"peft {peft.__version__} binds convert_peft_config_for_transformers in peft.tuners.tuners_utils, "
            f"where wrapping its module would not reach; mixtral_compat/peft.py is written for {SUPPORTED}"
        )
    if getattr(original, "_skips_native_mixtral", False):
        return

    @functools.wraps(original)
    def convert_unless_native(peft_config, model, conversions=None):
        if _is_native_mixtral(model):
            return None
        return original(peft_config, model=model, conversions=conversions)

    convert_unless_native._skips_native_mixtral = True
    conversion.convert_peft_config_for_transformers = convert_unless_native


@dataclass
class LoraParts:
    """What PEFT's LoRA `Linear.forward` computes with for one active vanilla adapter:
    base(x) + B(A(dropout(x))) * scaling."""

    base: nn.Module
    A: nn.Parameter  # (r, in)
    B: nn.Parameter  # (out, r)
    dropout: nn.Module
    scaling: float
    cast_input: bool  # the layer casts x to the adapter dtype before the adapter


def lora_layer_classes() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(PEFT's plain LoRA Linear classes, its bitsandbytes 4-bit LoRA classes); empty without PEFT."""
    try:
        from peft.tuners.lora import layer as lora_layer
    except ImportError:
        return (), ()
    plain = (lora_layer.Linear,)
    try:
        from peft.tuners.lora import bnb as lora_bnb

        quantized = (lora_bnb.Linear4bit,) if hasattr(lora_bnb, "Linear4bit") else ()
    except ImportError:
        quantized = ()
    return plain, quantized


def lora_layer_kind(layer: nn.Module) -> str | None:
    """'plain' for PEFT's LoRA Linear, '4bit' for its bitsandbytes 4-bit LoRA layer, else None."""
    plain, quantized = lora_layer_classes()
    if type(layer) in plain:
        return "plain"
    if type(layer) in quantized:
        return "4bit"
    return None


def vanilla_lora_parts(layer: nn.Module) -> LoraParts | None:
    """The parts of a PEFT LoRA layer's one active adapter in the plain case its forward computes as
    base(x) + lora_B(lora_A(dropout(x))) * scaling; None otherwise (merged or disabled adapters, several
    active, DoRA or another variant, a bias on lora_B, hooks anywhere)."""
    if layer.merged or layer.disable_adapters or has_hooks(layer):
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False):
        return None
    lora_A, lora_B, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
    if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear or lora_B.bias is not None:
        return None
    if any(has_hooks(m) for m in (lora_A, lora_B, dropout)):
        return None
    return LoraParts(
        base=layer.base_layer,
        A=lora_A.weight,
        B=lora_B.weight,
        dropout=dropout,
        scaling=layer.scaling[name],
        cast_input=getattr(layer, "cast_input_dtype_enabled", True),
    )
