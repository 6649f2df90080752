"""The model a pipeline trains: loaded from a checkpoint (or a seeded random init written as one),
optionally 4-bit quantized (QLoRA), wrapped with LoRA adapters, ready for the HF Trainer.

Random init is written to `OUTPUT_DIR/base/` as a hub-layout checkpoint first, so every rank loads
the same weights through the same path as a real checkpoint (ZeRO-3 zero.Init, bitsandbytes,
expert-parallel per-rank loading) and adapters saved later point to a base that exists.
"""

from pathlib import Path

import peft
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import BitsAndBytesConfig, PreTrainedTokenizerBase

from mixtral_model import MixtralConfig, MixtralForCausalLM
from mixtral_tune.config import (
    DTYPES,
    LORA_TARGET_MODULES,
    lora_modules_to_save,
    lora_target_modules,
    trainer_value,
    uses_adapters,
)
from mixtral_tune.esft import freeze_all_but_selected, load_selection, lora_target_regex

NEVER_QUANTIZED = ["gate", "lm_head"]  # the router and the output head stay in the compute dtype


def random_init_config(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase) -> MixtralConfig:
    # ArchitectureConfig's fields are MixtralConfig's names
    return MixtralConfig(
        **OmegaConf.to_container(cfg.model.architecture),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def write_random_init(
    cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, directory: Path, seed: int
) -> None:
    """A seeded random-init checkpoint (with its tokenizer) at `directory`, unless one is there already."""
    if (directory / "config.json").exists():
        return
    torch.manual_seed(seed)
    staging = directory.with_name(directory.name + ".tmp")
    MixtralForCausalLM(random_init_config(cfg, tokenizer)).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(directory)


def quantization_config(cfg: DictConfig) -> BitsAndBytesConfig | None:
    if cfg.peft.method != "qlora":
        return None
    quant = cfg.peft.quant
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=DTYPES[quant.compute_dtype],
        bnb_4bit_quant_storage=DTYPES.get(quant.quant_storage, torch.uint8),
        llm_int8_skip_modules=NEVER_QUANTIZED,
    )


def load_model(cfg: DictConfig, name_or_path: str) -> MixtralForCausalLM:
    """Our Mixtral from a hub-layout checkpoint, with the run's router and parallel settings."""
    model = MixtralForCausalLM.from_pretrained(
        name_or_path,
        dtype=DTYPES[cfg.model.dtype],
        attn_implementation=cfg.model.attn_implementation,
        quantization_config=quantization_config(cfg),
        router_aux_loss_coef=cfg.model.router_aux_loss_coef,
        router_jitter_noise=cfg.model.router_jitter_noise,
        router_z_loss_coef=cfg.model.router_z_loss_coef,
        expert_parallel_size=cfg.model.expert_parallel_size,
    )
    model.config.use_cache = False
    if cfg.peft.method == "qlora":
        keep_4bit_training_layout(model)
    return model


def keep_4bit_training_layout(model) -> None:
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
            "check how this version repacks 4-bit weights on CPU before training with it"
        )
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False


def prepare_4bit_for_training(model: MixtralForCausalLM, gradient_checkpointing: bool) -> None:
    """Freeze the 4-bit base and turn on gradient checkpointing (non-reentrant), as
    `peft.prepare_model_for_kbit_training` does, but keep the unquantized weights (embeddings, lm_head,
    norms, routers) in the dtype they were loaded in.

    PEFT's helper casts every non-4-bit bf16 parameter to fp32. They are frozen, so fp32 buys no
    precision in training (the norms compute in fp32 anyway and the loss upcasts the logits), while
    it doubles their bytes and, through the fp32 embedding output and norm weights, makes every
    activation of the residual stream and of the layers' recomputation fp32: for Mixtral-8x7B QLoRA
    at 4096 tokens about 3 GiB more at peak (`mixtral_tune/memory.py`, bench/gpu_check.py's account). The
    LoRA adapters PEFT adds are still fp32 (`get_peft_model`'s `autocast_adapter_dtype`)."""
    model.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def apply_peft(model: MixtralForCausalLM, cfg: DictConfig, gradient_checkpointing: bool):
    """LoRA (or QLoRA) adapters on the configured targets; the router is never wrapped."""
    if cfg.peft.method == "none":
        return model
    if cfg.peft.method == "esft":
        freeze_all_but_selected(model, selected_experts(cfg, model))
        if cfg.peft.train_router:
            for name, module in model.named_modules():
                if name.endswith(".gate"):
                    module.requires_grad_(True)
        return model
    if cfg.peft.method == "qlora":
        prepare_4bit_for_training(model, gradient_checkpointing)
    targets = lora_target_modules(cfg)
    if cfg.peft.esft_selection:  # LoRA on the selected experts only (and attention, as peft.targets says)
        attention = [name for name in targets if name not in LORA_TARGET_MODULES["experts"]]
        targets = lora_target_regex(selected_experts(cfg, model), attention)
    lora = peft.LoraConfig(
        r=cfg.peft.r,
        lora_alpha=cfg.peft.alpha,
        lora_dropout=cfg.peft.dropout,
        target_modules=targets,
        modules_to_save=lora_modules_to_save(cfg) or None,
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, lora)
    # The dropout layers are built above; the saved adapter_config.json records the inference value 0
    # (peft.dropout stays in run_config.yaml): PEFT loads adapters onto transformers' fused Mixtral
    # experts through its ParamWrapper, which refuses any lora_dropout != 0, even for inference.
    model.peft_config["default"].lora_dropout = 0.0
    return model


def selected_experts(cfg: DictConfig, model) -> list[list[int]]:
    return load_selection(
        cfg.peft.esft_selection, model.config.num_hidden_layers, model.config.num_local_experts
    )


def base_model_path(cfg: DictConfig) -> str:
    """model.name_or_path, or the random-init base (absolute, so saved adapters can find it)."""
    return cfg.model.name_or_path or str(Path(cfg.output_dir).resolve() / "base")


def build_model(cfg: DictConfig):
    """The trainable model: checkpoint (or random init written to OUTPUT_DIR/base) + PEFT."""
    model = load_model(cfg, base_model_path(cfg))
    return apply_peft(model, cfg, trainer_value(cfg, "activation_checkpointing"))


def build_frozen_reference(cfg: DictConfig) -> MixtralForCausalLM | None:
    """DPO reference: None under LoRA/QLoRA (the base with adapters disabled), else a frozen copy of the base."""
    if uses_adapters(cfg):
        return None
    reference = load_model(cfg, base_model_path(cfg))
    reference.requires_grad_(False)
    return reference.eval()
