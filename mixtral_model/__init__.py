"""Native Mixtral for fine-tuning: `from mixtral_model import MixtralConfig, MixtralForCausalLM, load_tokenizer`."""

from .checkpoint import CheckpointError
from .config import MixtralConfig
from .model import MixtralForCausalLM, MixtralModel
from .tokenizer import encode_chat, load_tokenizer

__all__ = [
    "CheckpointError",
    "MixtralConfig",
    "MixtralForCausalLM",
    "MixtralModel",
    "encode_chat",
    "load_tokenizer",
]
