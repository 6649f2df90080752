"""The model a pipeline trains: loaded from a checkpoint (or a seeded random init written as one),
optionally 4-bit quantized (QLoRA), wrapped with LoRA adapters, ready for the HF Trainer.

Random init is written to `OUTPUT_DIR/base/` as a hub-layout checkpoint first, so every rank loads
the same weights through the same path as a real checkpoint (ZeRO-3 zero.Init, bitsandbytes,
expert-parallel per-rank loading) and adapters saved later point to a base that exists.
"""

import shutil
from pathlib import Path

import peft
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import BitsAndBytesConfig, PreTrainedTokenizerBase

from mixtral_compat.bitsandbytes import keep_4bit_training_layout
from mixtral_model import MixtralConfig, MixtralForCausalLM
from mixtral_parallel.expert_parallel import ExpertParallelGroups, new_expert_parallel_groups
from mixtral_tune.chat_template import template_tokens
from mixtral_tune.config import (
    DTYPES,
    LORA_TARGET_MODULES,
    lora_modules_to_save,
    lora_target_modules,
    trainer_value,
    uses_adapters,
)
from mixtral_tune.esft import freeze_all_but_selected, load_selection, lora_target_regex
from mixtral_tune.run_dir import write_random_init_record

NEVER_QUANTIZED = ["gate", "lm_head"]  # the router and the output head stay in the compute dtype


def random_init_config(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase) -> MixtralConfig:
    # ArchitectureConfig's fields are MixtralConfig's names. Ids of tokens a chat template added lie past the
    # base vocabulary: the base has none of them (build_model grows the vocabulary and sets eos).
    architecture = OmegaConf.to_container(cfg.model.architecture)
    in_base = {
        f"{name}_token_id": token_id
        if token_id is not None and token_id < architecture["vocab_size"]
        else None
        for name, token_id in (
            ("pad", tokenizer.pad_token_id),
            ("bos", tokenizer.bos_token_id),
            ("eos", tokenizer.eos_token_id),
        )
    }
    return MixtralConfig(**architecture, **in_base)


def write_random_init(
    cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, directory: Path, seed: int
) -> None:
    """A seeded random-init checkpoint (with its tokenizer and the record of what it was written for:
    mixtral_tune/run_dir.py) at `directory`, unless one is there already."""
    if (directory / "config.json").exists():
        return
    torch.manual_seed(seed)
    staging = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while writing it
    MixtralForCausalLM(random_init_config(cfg, tokenizer)).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    write_random_init_record(cfg, staging)
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


def expert_parallel_layout(cfg: DictConfig) -> ExpertParallelGroups | None:
    """The run's expert-parallel groups (collective: every rank), None at model.expert_parallel_size=1.
    Created once, before the model is built, and handed to everything that needs the layout."""
    size = cfg.model.expert_parallel_size
    return new_expert_parallel_groups(size) if size != 1 else None


def load_model(
    cfg: DictConfig, name_or_path: str, expert_parallel: ExpertParallelGroups | None = None
) -> MixtralForCausalLM:
    """Our Mixtral from a hub-layout checkpoint, with the run's router settings, made expert-parallel
    over `expert_parallel` (`expert_parallel_layout(cfg)`) as it loads."""
    if (1 if expert_parallel is None else expert_parallel.size) != cfg.model.expert_parallel_size:
        raise ValueError(
            f"model.expert_parallel_size={cfg.model.expert_parallel_size} but the expert-parallel layout "
            f"passed has size {1 if expert_parallel is None else expert_parallel.size}: pass expert_parallel_layout(cfg)"
        )
    model = MixtralForCausalLM.from_pretrained(
        name_or_path,
        dtype=DTYPES[cfg.model.dtype],
        attn_implementation=cfg.model.attn_implementation,
        quantization_config=quantization_config(cfg),
        router_aux_loss_coef=cfg.model.router_aux_loss_coef,
        router_jitter_noise=cfg.model.router_jitter_noise,
        router_z_loss_coef=cfg.model.router_z_loss_coef,
        expert_parallel=expert_parallel,
    )
    model.config.use_cache = False
    if cfg.peft.method == "qlora":
        keep_4bit_training_layout(model)
    return model


def prepare_4bit_for_training(model: MixtralForCausalLM, gradient_checkpointing: bool) -> None:
    """Freeze the 4-bit base and turn on gradient checkpointing (non-reentrant), as
    `peft.prepare_model_for_kbit_training` does, but keep the unquantized weights (embeddings, lm_head,
    norms, routers) in the dtype they were loaded in.

    PEFT's helper casts every non-4-bit bf16 parameter to fp32. They are frozen, so fp32 buys no
    precision in training (the norms compute in fp32 anyway and the loss upcasts the logits), while
    it doubles their bytes and, through the fp32 embedding output and norm weights, makes every
    activation of the residual stream and of the layers' recomputation fp32 (bench/gpu_check.py's memory
    account gives the difference at peak for Mixtral-8x7B QLoRA). The
    LoRA adapters PEFT adds are still fp32 (`get_peft_model`'s `autocast_adapter_dtype`)."""
    model.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def fit_vocabulary(model: MixtralForCausalLM, tokenizer: PreTrainedTokenizerBase | None) -> None:
    """Embeddings and output head grown to the tokenizer when a chat template added tokens
    (transformers' `resize_token_embeddings`: new rows drawn around the old rows' mean), and the
    model's eos the tokenizer's."""
    if tokenizer is not None and len(tokenizer) > model.config.vocab_size:
        model.resize_token_embeddings(len(tokenizer))
        # the template's end of turn, as TRL's clone_chat_template sets it
        model.config.eos_token_id = tokenizer.eos_token_id


def apply_peft(model: MixtralForCausalLM, cfg: DictConfig, gradient_checkpointing: bool, new_tokens=()):
    """LoRA (or QLoRA) adapters on the configured targets; the router is never wrapped.

    `new_tokens` (ids a chat template added): their embedding rows are trained and saved with the
    adapter (PEFT's `trainable_token_indices`; the other rows stay frozen), and the output head is
    trained and saved whole (PEFT's `modules_to_save`): TRL's fused LM-head loss reads the head's
    `weight` directly, which PEFT's trainable-tokens wrapper would bypass, and a full copy it does not.
    """
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
        modules_to_save=lora_modules_to_save(cfg) + (["lm_head"] if new_tokens else []) or None,
        trainable_token_indices={"embed_tokens": list(new_tokens)} if new_tokens else None,
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


def build_model(
    cfg: DictConfig,
    tokenizer: PreTrainedTokenizerBase | None = None,
    expert_parallel: ExpertParallelGroups | None = None,
):
    """The trainable model: checkpoint (or random init written to OUTPUT_DIR/base), expert-parallel over
    `expert_parallel` (`expert_parallel_layout(cfg)`), its vocabulary fitted to `tokenizer` (a chat
    template's added tokens), + PEFT."""
    model = load_model(cfg, base_model_path(cfg), expert_parallel)
    fit_vocabulary(model, tokenizer)
    new_tokens = tokenizer.convert_tokens_to_ids(template_tokens(cfg.data)) if cfg.data.chat_template else []
    return apply_peft(model, cfg, trainer_value(cfg, "activation_checkpointing"), new_tokens)


def build_frozen_reference(
    cfg: DictConfig,
    tokenizer: PreTrainedTokenizerBase | None = None,
    expert_parallel: ExpertParallelGroups | None = None,
):
    """DPO reference: None under LoRA/QLoRA (the base with adapters disabled), else a frozen copy of the
    base, expert-parallel over the policy's groups."""
    if uses_adapters(cfg):
        return None
    reference = load_model(cfg, base_model_path(cfg), expert_parallel)
    fit_vocabulary(reference, tokenizer)
    reference.requires_grad_(False)
    return reference.eval()
