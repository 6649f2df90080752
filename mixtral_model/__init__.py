"""Native Mixtral for fine-tuning: `from mixtral_model import MixtralConfig, MixtralForCausalLM, load_tokenizer`."""

from . import quiet  # noqa: F401  (first: drops start-up messages nobody can act on; see quiet.py)
from .checkpoint import CheckpointError
from .config import MixtralConfig
from .model import MixtralForCausalLM, MixtralModel
from .peft_compat import skip_peft_target_rewrite_for_native_mixtral
from .tokenizer import encode_chat, load_tokenizer

skip_peft_target_rewrite_for_native_mixtral()

__all__ = [
    "CheckpointError",
    "MixtralConfig",
    "MixtralForCausalLM",
    "MixtralModel",
    "encode_chat",
    "load_tokenizer",
]
