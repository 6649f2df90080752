"""Mixtral configuration: reads and writes the hub `config.json` (`model_type: mixtral`).

Both rope forms are accepted: the original `rope_theta` key of the hub checkpoints and the
transformers-5 `rope_parameters` dict. Fields beyond the hub schema (router z-loss, expert
capacity) default to the behaviour of the public model.
"""

from transformers import PreTrainedConfig


class MixtralConfig(PreTrainedConfig):
    model_type = "mixtral"
    default_theta = 1_000_000.0
    attribute_map = {"num_experts": "num_local_experts"}
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096 * 32
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    attention_dropout: float | int = 0.0
    num_experts_per_tok: int = 2
    num_local_experts: int = 8
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    router_jitter_noise: float = 0.0
    rope_parameters: dict | None = None
    # Extensions (not in the hub schema; transformers ignores them when loading our config.json).
    router_z_loss_coef: float = 0.0  # ST-MoE z-loss weight, added when router logits are requested
    expert_capacity_factor: float | None = None  # None = dropless; else per-expert capacity (moe.py)

    def __post_init__(self, **kwargs):
        if kwargs.pop("expert_parallel_size", 1) != 1:  # a field of older versions: now a launch choice
            raise ValueError(
                "expert_parallel_size is not a model config field: pass it to from_pretrained, or apply "
                "mixtral_parallel.expert_parallel.parallelize_experts to the built model"
            )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)
        self._check_shapes()
        self._check_expert_capacity()

    def _check_shapes(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be between 1 and "
                f"num_local_experts={self.num_local_experts}"
            )

    def _check_expert_capacity(self) -> None:
        factor = self.expert_capacity_factor
        if factor is not None and not (isinstance(factor, int | float) and factor > 0):
            raise ValueError(
                f"expert_capacity_factor={factor!r} must be a positive number, or None for dropless routing"
            )
