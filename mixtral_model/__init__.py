"""Native Mixtral for fine-tuning: `from mixtral_model import MixtralConfig, MixtralForCausalLM, load_tokenizer`."""
# ruff: noqa: E402  (the version check runs before any library is imported)

from mixtral_compat import check_versions

check_versions()  # before any library is imported: one line naming a library outside the checked range

from mixtral_compat.peft import skip_peft_target_rewrite_for_native_mixtral

from . import quiet  # noqa: F401  (first: drops start-up messages nobody can act on; see quiet.py)
from .config import MixtralConfig
from .hub_weights import CheckpointError
from .model import MixtralForCausalLM, MixtralModel
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
