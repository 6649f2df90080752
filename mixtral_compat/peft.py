"""Keep PEFT from re-targeting LoRA on our experts.

PEFT (>= 0.18, with transformers 5) rewrites the LoRA targets of every model whose config says
`model_type: mixtral`: `w1`/`w3`/`w2` become the fused 3-D `gate_up_proj`/`down_proj` parameters
of transformers' own Mixtral. Our experts are real `nn.Linear` modules named `w1`/`w2`/`w3` (the hub
layout), so for our model that rewrite targets parameters that do not exist. This module wraps
PEFT's rewrite so it skips our model and still applies to transformers' Mixtral — which is what
lets an adapter trained here load onto `transformers.MixtralForCausalLM` through
`peft.PeftModel.from_pretrained` (PEFT converts our per-expert adapter to the fused layout).
"""

import functools

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
