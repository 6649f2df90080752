"""Mixtral decoder: embeddings -> N x (attention + sparse MoE, pre-norm residual) -> norm -> LM head.

Module names follow the hub checkpoints (`model.layers.N.self_attn.q_proj`,
`model.layers.N.block_sparse_moe.experts.E.w1`, ...), so PreTrainedModel's own loading machinery
(meta-device init, DeepSpeed zero.Init, bitsandbytes quantization, sharded safetensors) reads and
writes the hub layout with no key conversion.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast

from mixtral_compat.transformers import PreTrainedModelHooks

from .attention import ATTENTION_BACKENDS, Attention
from .config import MixtralConfig
from .cross_entropy import cross_entropy_sum
from .flash_attention import check_flash_attention_available
from .hub_weights import CheckpointLoadingMixin
from .masks import AttentionLayout, packed_sequence_ids
from .moe import Expert, Router, SparseMoeBlock
from .norm import RMSNorm
from .rope import RotaryEmbedding, rope_inverse_frequencies
from .router_losses import load_balancing_loss, router_z_loss


@dataclass
class MixtralModelOutput(MoeModelOutputWithPast):
    pass


@dataclass
class MixtralCausalLMOutput(MoeCausalLMOutputWithPast):
    """transformers' MoE output plus the router z-loss (None unless router_z_loss_coef > 0)."""

    z_loss: torch.Tensor | None = None


class DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MixtralConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.block_sparse_moe = SparseMoeBlock(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x_BTD, rope_cos_sin=None, layout=None, cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the new hidden states (B, T, D) and this layer's router logits (B*T, E)."""
        h_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), rope_cos_sin, layout, cache)
        moe_out_BTD, router_logits_NE = self.block_sparse_moe(self.post_attention_layernorm(h_BTD))
        return h_BTD + moe_out_BTD, router_logits_NE


class MixtralPreTrainedModel(CheckpointLoadingMixin, PreTrainedModelHooks, PreTrainedModel):
    config_class = MixtralConfig
    config: MixtralConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = False

    def checked_attn_implementation(self, attn_implementation: str | None) -> str:
        """The backend transformers sets in the config (`mixtral_compat.transformers.PreTrainedModelHooks`).
        Our backends only: sdpa (default), eager, flash_attention_2 (checked for availability)."""
        requested = attn_implementation or "sdpa"
        if requested not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attn_implementation={requested!r} is not supported; choose one of {sorted(ATTENTION_BACKENDS)}"
            )
        if requested == "flash_attention_2":
            check_flash_attention_available()
        return requested

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear | Router):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, RotaryEmbedding):
            # Non-persistent buffer: recomputed after meta-device init, since no checkpoint holds it.
            init.copy_(module.inv_freq, rope_inverse_frequencies(module.head_dim, module.theta))


class MixtralModel(MixtralPreTrainedModel):
    def __init__(self, config: MixtralConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_parameters)
        self.gradient_checkpointing = False
        self.post_init()

    def attention_layout(self, attention_mask, position_ids_BT, cache, q_len) -> AttentionLayout:
        q_start = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"attention_mask must be 2-D (batch, tokens), got shape {tuple(attention_mask.shape)}"
            )
        packed = q_start == 0  # position ids restarting inside a row mark packed sequences
        return AttentionLayout(
            q_start=q_start,
            q_len=q_len,
            padding_mask_BS=attention_mask,
            sequence_ids_BT=packed_sequence_ids(position_ids_BT) if packed else None,
            sliding_window=self.config.sliding_window,
        )

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache: Cache | None = None,
        inputs_embeds=None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> MixtralModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        cache = cache if cache is not None else past_key_values
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None
        x_BTD = inputs_embeds if inputs_embeds is not None else self.embed_tokens(input_ids)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + x_BTD.shape[1], device=x_BTD.device)[None]
        layout = self.attention_layout(attention_mask, position_ids, cache, x_BTD.shape[1])
        rope_cos_sin = self.rotary_emb(x_BTD, position_ids)
        router_logits = []
        for layer in self.layers:
            x_BTD, layer_router_logits = layer(x_BTD, rope_cos_sin=rope_cos_sin, layout=layout, cache=cache)
            router_logits.append(layer_router_logits)
        return MixtralModelOutput(
            last_hidden_state=self.norm(x_BTD), cache=cache, router_logits=tuple(router_logits)
        )


def causal_lm_loss(logits_BTV, labels_BT, num_items_in_batch=None, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross entropy in fp32; mean over labelled tokens, or sum / num_items_in_batch
    (transformers' `ForCausalLMLoss`, computed a few rows at a time: `cross_entropy.py`)."""
    shifted_labels_N = F.pad(labels_BT, (0, 1), value=ignore_index)[:, 1:].reshape(-1).to(logits_BTV.device)
    divisor = (
        num_items_in_batch if num_items_in_batch is not None else (shifted_labels_N != ignore_index).sum()
    )
    logits_NV = logits_BTV.reshape(-1, logits_BTV.shape[-1])
    return cross_entropy_sum(logits_NV, shifted_labels_N, ignore_index, divisor)


class MixtralForCausalLM(MixtralPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MixtralConfig):
        super().__init__(config)
        self.model = MixtralModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # None: the aux loss of each forward alone (transformers' semantics); global-batch balance
        # sets it from outside (mixtral_parallel/global_balance.py).
        self.global_load = None
        self.post_init()

    def router_losses(self, router_logits, attention_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Aux (and z) loss over this forward's tokens; with a KV cache the mask also covers earlier
        tokens, so only its last columns (the tokens routed now) count."""
        if attention_mask is not None:
            routed_now = router_logits[0].shape[0] // attention_mask.shape[0]
            attention_mask = attention_mask[:, -routed_now:]
        aux_loss = load_balancing_loss(
            router_logits,
            self.config.num_local_experts,
            self.config.num_experts_per_tok,
            attention_mask,
            global_load=self.global_load,
        )
        z_loss = router_z_loss(router_logits, attention_mask) if self.config.router_z_loss_coef > 0 else None
        return aux_loss, z_loss

    def router_objective(
        self, router_logits, attention_mask
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(router_aux_loss_coef * aux + router_z_loss_coef * z, aux, z): the router terms of the
        training objective, with the config's coefficients. The one place they are weighted: this
        model's forward(labels=...) adds them to its LM loss, and the SFT/DPO trainers to theirs
        (mixtral_tune/training/objective.py)."""
        aux_loss, z_loss = self.router_losses(router_logits, attention_mask)
        weighted = self.config.router_aux_loss_coef * aux_loss
        if z_loss is not None:
            weighted = weighted + self.config.router_z_loss_coef * z_loss
        return weighted, aux_loss, z_loss

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache: Cache | None = None,
        inputs_embeds=None,
        labels=None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        num_items_in_batch=None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MixtralCausalLMOutput:
        """loss = CE + router_aux_loss_coef * aux_loss (+ router_z_loss_coef * z_loss) when labels
        are given and router logits are requested (argument or config.output_router_logits)."""
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        hidden_BTD = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits_BTV = self.lm_head(hidden_BTD[:, keep, :])
        loss = causal_lm_loss(logits_BTV, labels, num_items_in_batch) if labels is not None else None
        aux_loss = z_loss = None
        if output_router_logits:
            router_loss, aux_loss, z_loss = self.router_objective(outputs.router_logits, attention_mask)
            if loss is not None:
                loss = loss + router_loss.to(loss.device)
        output = MixtralCausalLMOutput(
            loss=loss,
            aux_loss=aux_loss,
            z_loss=z_loss,
            logits=logits_BTV,
            cache=outputs.cache,
            router_logits=outputs.router_logits if output_router_logits else None,
        )
        return output if return_dict is not False else output.to_tuple()


__all__ = [
    "MixtralForCausalLM",
    "MixtralModel",
    "MixtralPreTrainedModel",
    "Expert",
    "Router",
    "causal_lm_loss",
]
