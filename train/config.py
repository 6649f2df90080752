"""Typed Hydra configuration of the SFT and DPO pipelines: schema, composition, validation.

The schema below is registered with Hydra's ConfigStore and composed with the groups in `configs/`
(`model`, `data`, `peft`, `deepspeed`, `trainer`) from the primary configs `configs/sft.yaml` and
`configs/dpo.yaml`. Struct mode rejects unknown keys and OmegaConf rejects wrong types at compose
time; `validate` adds the cross-field checks. Both fail before any model is built, with a one-line
`ConfigError` naming the key and the fix.

Recipes live in `recipes/<model>/<name>.yaml` and are selected with `+recipe=<model>/<name>`: every
recipe file is registered in the ConfigStore as an option of the group `recipe` at the global
package, so it can override group choices (`override /peft: qlora`) and any value. Command-line
overrides still win over the recipe: `+recipe=tiny/sft max_steps=5 peft=lora`.
"""

import dataclasses
import difflib
import functools
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from train.checkpoints import latest_complete_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
RECIPE_DIR = REPO_ROOT / "recipes"

STAGES = ("sft", "dpo")
DTYPES = ("float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
PEFT_METHODS = ("none", "lora", "qlora")
QUANT_TYPES = ("nf4", "fp4")
REPORT_TO = ("wandb", "tensorboard", "none")
DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip
LORA_TARGET_MODULES = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "experts": ["w1", "w2", "w3"],
    "both": ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"],
}
ROUTER_MODULES = ["gate"]


class ConfigError(ValueError):
    """A configuration a user can fix: the message names the key and the fix, on one line."""


@dataclass
class ArchitectureConfig:
    """Shape of the network: used for random init, and checked against a loaded checkpoint."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    max_position_embeddings: int = 32768
    rope_theta: float = 1.0e6


@dataclass
class ModelConfig:
    name_or_path: str | None = None  # hub name or local dir; null = random init from `architecture`
    architecture: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    tokenizer: str | None = None  # null = the Mixtral tokenizer built offline by `load_tokenizer()`
    dtype: str = "bfloat16"
    attn_implementation: str = "sdpa"
    expert_parallel_size: int = 1
    router_aux_loss_coef: float = 0.02
    router_jitter_noise: float = 0.0
    router_z_loss_coef: float = 0.0


@dataclass
class DataConfig:
    path: str = MISSING  # local .jsonl/.json/.parquet file, or a hub dataset name
    kind: str = MISSING  # sft: messages or prompt/completion rows; dpo: prompt/chosen/rejected rows
    split: str = "train"  # hub datasets only
    eval_path: str | None = None
    eval_split: str = "test"  # hub datasets only
    eval_fraction: float = 0.0  # held out from `path` when no eval_path is given
    max_length: int = 2048
    packing: bool = False  # SFT only
    completion_only: bool = True  # SFT: loss on assistant tokens only
    max_bad_fraction: float = 0.1
    max_reported_bad_rows: int = 5


@dataclass
class QuantConfig:
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    quant_storage: str = "bfloat16"  # must equal compute_dtype under ZeRO-3


@dataclass
class PeftConfig:
    method: str = "none"
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: str = "both"  # attention | experts | both
    train_router: bool = False  # train the router weights fully (PEFT modules_to_save); never LoRA-wrapped
    quant: QuantConfig = field(default_factory=QuantConfig)


@dataclass
class DpoConfig:
    beta: float = 0.1
    loss_type: str = "sigmoid"
    precompute_ref_log_probs: bool = False


@dataclass
class TrainerConfig:
    learning_rate: float = 2.0e-5
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    num_train_epochs: float = 1.0  # used when max_steps is -1
    per_device_train_batch_size: int = 1
    per_device_eval_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = True
    logging_steps: int = 10
    eval_steps: int | None = None  # null = no periodic evaluation
    save_steps: int = 500
    save_total_limit: int | None = 2
    seed: int = 42
    report_to: str = "wandb"
    run_name: str | None = None
    dpo: DpoConfig = field(default_factory=DpoConfig)


@dataclass
class TrainConfig:
    stage: str = MISSING  # sft | dpo: which pipeline this config is for
    output_dir: str = MISSING
    max_steps: int = MISSING  # -1 = train for trainer.num_train_epochs
    resume: Any = False  # false | true (latest checkpoint in output_dir) | path to a checkpoint dir
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    deepspeed: dict[str, Any] = field(default_factory=dict)  # DeepSpeed JSON as a dict; {} = off
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


@functools.cache
def register_configs() -> None:
    """Register the schema, every recipe file (as group `recipe`) and the `${repo_root:}` resolver."""
    OmegaConf.register_new_resolver("repo_root", lambda: str(REPO_ROOT), replace=True)
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    for name, path in recipe_files().items():
        group, _, option = f"recipe/{name}".rpartition("/")
        store.store(group=group, name=option, node=OmegaConf.load(path), package="_global_")


def recipe_files() -> dict[str, Path]:
    """Recipe name (`tiny/sft`) -> YAML file, for every recipe shipped in `recipes/`."""
    return {
        str(path.relative_to(RECIPE_DIR).with_suffix("")): path for path in sorted(RECIPE_DIR.rglob("*.yaml"))
    }


def compose(config_name: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose `configs/<config_name>.yaml` with Hydra overrides; composition errors become ConfigError."""
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(describe_composition_error(error)) from error


def load_config(config_name: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose and validate the config of pipeline `config_name` (sft | dpo), or raise ConfigError."""
    cfg = compose(config_name, overrides)
    if cfg.stage != config_name:
        raise ConfigError(
            f"this config is for the {cfg.stage} pipeline (stage={cfg.stage}, set by the recipe): "
            f"launch it with ./launch.sh {cfg.stage}"
        )
    validate(cfg)
    return cfg


def describe_composition_error(error: Exception) -> str:
    """One line naming the key and the fix, from Hydra's and OmegaConf's multi-line errors."""
    cause = error.__cause__ if isinstance(error.__cause__, OmegaConfBaseException) else error
    key = getattr(cause, "full_key", None)
    if isinstance(cause, OmegaConfBaseException) and key:
        problem = str(cause).splitlines()[0]
        if "not in" in problem and key.startswith("deepspeed."):
            return f"'{key}' is not in the selected DeepSpeed config: add it with +{key}=..."
        if "not in" in problem:
            return f"unknown key '{key}'{suggest_key(key)}: check its spelling against train/config.py"
        if "Missing mandatory value" in problem:
            return f"'{key}' must be set: pass {key}=... or pick a recipe that sets it"
        return f"bad value for '{key}': {problem}; pass a value of the type declared in train/config.py"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "Could not find 'recipe/" in lines[0]:
        return f"{lines[0]}; available recipes: {', '.join(recipe_files())}"
    if "Could not find" in lines[0]:
        options = [
            line for line in lines[1:] if not line.startswith(("Available", "Config search", "provider="))
        ]
        return f"{lines[0]}; available: {', '.join(options)}"
    return " ".join(lines)


def suggest_key(key: str) -> str:
    """' (did you mean X?)' for the closest schema key: same section first, then anywhere."""
    parent, _, name = key.rpartition(".")
    known = schema_keys()
    siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == parent}
    anywhere = {k.rpartition(".")[2]: k for k in known}
    for names, cutoff in ((siblings, 0.6), (anywhere, 0.8)):
        close = difflib.get_close_matches(name, names, n=1, cutoff=cutoff)
        if close:
            return f" (did you mean '{names[close[0]]}'?)"
    return ""


def schema_keys(schema: type = None, prefix: str = "") -> list[str]:
    """Full names of every leaf key of the schema (DeepSpeed's free-form dict counts as one)."""
    keys = []
    for item in dataclasses.fields(schema or TrainConfig):
        name = f"{prefix}{item.name}"
        keys += schema_keys(item.type, f"{name}.") if dataclasses.is_dataclass(item.type) else [name]
    return keys


def validate(cfg: DictConfig) -> None:
    """Cross-field checks on a composed config; raise ConfigError on the first problem found."""
    for check in (
        check_required_values,
        check_stage,
        check_steps_and_resume,
        check_model,
        check_expert_parallel,
        check_attention,
        check_data,
        check_peft,
        check_deepspeed,
        check_trainer,
    ):
        check(cfg)


def check_required_values(cfg: DictConfig) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"'{missing[0]}' must be set: pass {missing[0]}=... or pick a recipe that sets it")


def check_stage(cfg: DictConfig) -> None:
    require_choice("stage", cfg.stage, STAGES)
    if cfg.data.kind != cfg.stage:
        raise ConfigError(
            f"data.kind={cfg.data.kind} does not fit the {cfg.stage} pipeline: use data.kind={cfg.stage} "
            f"with {cfg.stage.upper()} rows, or run the {cfg.data.kind} pipeline"
        )


def check_steps_and_resume(cfg: DictConfig) -> None:
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        raise ConfigError(
            f"max_steps={cfg.max_steps}: use a positive number of steps, or -1 for trainer.num_train_epochs"
        )
    resume = resume_checkpoint(cfg)
    if isinstance(resume, str) and not Path(resume).is_dir():
        raise ConfigError(
            f"resume={resume}: no such checkpoint directory; pass resume=true or an existing checkpoint path"
        )
    if resume is True and not latest_complete_checkpoint(cfg.output_dir):
        raise ConfigError(
            f"resume=true but output_dir={cfg.output_dir} has no complete checkpoint-* directory; "
            "drop resume or point it at a checkpoint"
        )


def resume_checkpoint(cfg: DictConfig) -> bool | str:
    """`resume` as the pipelines use it: False, True (latest in output_dir) or a checkpoint path."""
    resume = cfg.resume
    if isinstance(resume, str) and resume.lower() in ("true", "false"):
        return resume.lower() == "true"
    if isinstance(resume, bool) or (isinstance(resume, str) and resume):
        return resume
    raise ConfigError(
        f"resume={resume!r}: use resume=true, resume=false or resume=PATH to a checkpoint directory"
    )


def check_model(cfg: DictConfig) -> None:
    model, arch = cfg.model, cfg.model.architecture
    require_choice("model.dtype", model.dtype, DTYPES)
    if (
        model.name_or_path
        and looks_like_local_path(model.name_or_path)
        and not Path(model.name_or_path).exists()
    ):
        raise ConfigError(
            f"model.name_or_path={model.name_or_path} does not exist: fix the path, or use a hub name"
        )
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "num_local_experts", "num_experts_per_tok", "max_position_embeddings"):  # fmt: skip
        require_positive(f"model.architecture.{key}", arch[key])
    if arch.hidden_size % arch.num_attention_heads:
        raise ConfigError(
            f"model.architecture.hidden_size={arch.hidden_size} is not divisible by "
            f"num_attention_heads={arch.num_attention_heads}: pick sizes that divide"
        )
    if arch.num_attention_heads % arch.num_key_value_heads:
        raise ConfigError(
            f"model.architecture.num_attention_heads={arch.num_attention_heads} is not a multiple of "
            f"num_key_value_heads={arch.num_key_value_heads}: pick a divisor for the KV heads"
        )
    if arch.num_experts_per_tok > arch.num_local_experts:
        raise ConfigError(
            f"model.architecture.num_experts_per_tok={arch.num_experts_per_tok} exceeds "
            f"num_local_experts={arch.num_local_experts}: route to at most that many experts"
        )
    for key in ("router_aux_loss_coef", "router_jitter_noise", "router_z_loss_coef"):
        if model[key] < 0:
            raise ConfigError(f"model.{key}={model[key]} is negative: use 0 to disable it")


def check_architecture_matches(cfg: DictConfig, model_config: Any) -> None:
    """Raise ConfigError when a checkpoint's config (loaded without weights) differs from model.architecture."""
    expected = OmegaConf.to_container(cfg.model.architecture)
    found = {key: getattr(model_config, key, None) for key in expected}
    found["rope_theta"] = (getattr(model_config, "rope_parameters", None) or {}).get(
        "rope_theta", found["rope_theta"]
    )
    for key, value in expected.items():
        if found[key] is not None and found[key] != value:
            raise ConfigError(
                f"model.architecture.{key}={value} but {cfg.model.name_or_path} has {found[key]}: "
                "fix the model group (configs/model/) or pick the matching one"
            )


def check_expert_parallel(cfg: DictConfig) -> None:
    size, experts, world = (
        cfg.model.expert_parallel_size,
        cfg.model.architecture.num_local_experts,
        world_size(),
    )
    require_positive("model.expert_parallel_size", size)
    if experts % size:
        raise ConfigError(
            f"model.expert_parallel_size={size} does not divide num_local_experts={experts}: use a divisor of {experts}"
        )
    if world % size:
        raise ConfigError(
            f"model.expert_parallel_size={size} does not divide the world size {world}: "
            f"launch a multiple of {size} processes or lower it"
        )
    if size == 1:
        return
    if not cfg.deepspeed:
        raise ConfigError(
            f"model.expert_parallel_size={size} needs DeepSpeed (deepspeed=zero2 or zero3): plain data "
            "parallelism would average the gradients of different experts"
        )
    if resume_checkpoint(cfg) is not False and (cfg.peft.method == "none" or zero_stage(cfg) != 3):
        raise ConfigError(
            f"model.expert_parallel_size={size} with resume needs peft=lora|qlora and deepspeed=zero3 (other "
            "expert-parallel DeepSpeed checkpoints do not restore every rank's experts yet); start a new run"
        )


def check_attention(cfg: DictConfig) -> None:
    implementation = cfg.model.attn_implementation
    require_choice("model.attn_implementation", implementation, ATTN_IMPLEMENTATIONS)
    if implementation != "flash_attention_2":
        return
    import torch

    if importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available():
        raise ConfigError(
            "model.attn_implementation=flash_attention_2 needs a CUDA GPU and the flash-attn package "
            "(pip install -e '.[gpu]'): use model.attn_implementation=sdpa otherwise"
        )
    if cfg.model.dtype == "float32":
        raise ConfigError(
            "model.attn_implementation=flash_attention_2 runs in bf16/fp16: set model.dtype=bfloat16"
        )


def check_data(cfg: DictConfig) -> None:
    data = cfg.data
    require_choice("data.kind", data.kind, STAGES)
    require_positive("data.max_length", data.max_length)
    if data.packing and data.kind != "sft":
        raise ConfigError("data.packing=true is for SFT data only: set data.packing=false for DPO")
    if not 0.0 <= data.max_bad_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_fraction={data.max_bad_fraction} must be within [0, 1]")
    if not 0.0 <= data.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction={data.eval_fraction} must be within [0, 1)")
    if data.eval_path and data.eval_fraction > 0:
        raise ConfigError(
            "data.eval_path and data.eval_fraction are both set: keep one of them (set the other to null/0)"
        )
    for key in ("path", "eval_path"):
        if data[key] and looks_like_local_path(data[key]) and not Path(data[key]).is_file():
            raise ConfigError(
                f"data.{key}={data[key]} is not a file: fix the path, or give a hub dataset name"
            )


def check_peft(cfg: DictConfig) -> None:
    peft = cfg.peft
    require_choice("peft.method", peft.method, PEFT_METHODS)
    if peft.method == "none":
        return
    require_positive("peft.r", peft.r)
    require_positive("peft.alpha", peft.alpha)
    require_choice("peft.targets", peft.targets, tuple(LORA_TARGET_MODULES))
    if not 0.0 <= peft.dropout < 1.0:
        raise ConfigError(f"peft.dropout={peft.dropout} must be within [0, 1)")
    if peft.method == "qlora":
        check_qlora(cfg)


def check_qlora(cfg: DictConfig) -> None:
    quant = cfg.peft.quant
    require_choice("peft.quant.quant_type", quant.quant_type, QUANT_TYPES)
    require_choice("peft.quant.compute_dtype", quant.compute_dtype, DTYPES)
    require_choice("peft.quant.quant_storage", quant.quant_storage, (*DTYPES, "uint8"))
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "peft=qlora needs the bitsandbytes package: pip install bitsandbytes, or use peft=lora"
        )
    if zero_stage(cfg) == 3 and quant.quant_storage != quant.compute_dtype:
        raise ConfigError(
            f"peft=qlora with ZeRO-3 needs peft.quant.quant_storage == peft.quant.compute_dtype "
            f"(got {quant.quant_storage} vs {quant.compute_dtype}): set peft.quant.quant_storage={quant.compute_dtype}"
        )
    if offloads_parameters(cfg):
        raise ConfigError(
            "peft=qlora with deepspeed offload_param is not supported (bitsandbytes 4-bit weights are not "
            "offloaded by DeepSpeed; untested): use deepspeed=zero3 or deepspeed=zero2_offload"
        )


def check_deepspeed(cfg: DictConfig) -> None:
    if not cfg.deepspeed:
        return
    stage = zero_stage(cfg)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_optimization.stage={stage}: use 0, 1, 2 or 3")
    if offloads_parameters(cfg) and stage != 3:
        raise ConfigError("deepspeed offload_param needs ZeRO stage 3: use deepspeed=zero3_offload")
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            "deepspeed=... needs the deepspeed package: pip install deepspeed, or use deepspeed=none"
        )


def check_trainer(cfg: DictConfig) -> None:
    trainer = cfg.trainer
    if trainer.learning_rate <= 0:
        raise ConfigError(f"trainer.learning_rate={trainer.learning_rate} must be positive")
    if not 0.0 <= trainer.warmup_ratio < 1.0:
        raise ConfigError(f"trainer.warmup_ratio={trainer.warmup_ratio} must be within [0, 1)")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "logging_steps", "save_steps"):  # fmt: skip
        require_positive(f"trainer.{key}", trainer[key])
    if trainer.save_total_limit is not None:
        require_positive("trainer.save_total_limit", trainer.save_total_limit)
    if trainer.eval_steps is not None:
        require_positive("trainer.eval_steps", trainer.eval_steps)
    require_choice("trainer.report_to", trainer.report_to, REPORT_TO)
    require_choice("trainer.dpo.loss_type", trainer.dpo.loss_type, DPO_LOSS_TYPES)
    if trainer.dpo.beta <= 0:
        raise ConfigError(f"trainer.dpo.beta={trainer.dpo.beta} must be positive")


def zero_stage(cfg: DictConfig) -> int:
    """ZeRO stage of the DeepSpeed dict; 0 when DeepSpeed is off."""
    return int(cfg.deepspeed.get("zero_optimization", {}).get("stage", 0)) if cfg.deepspeed else 0


def offloads_parameters(cfg: DictConfig) -> bool:
    zero = cfg.deepspeed.get("zero_optimization", {}) if cfg.deepspeed else {}
    return zero.get("offload_param", {}).get("device", "none") != "none"


def deepspeed_dict(cfg: DictConfig) -> dict | None:
    """The DeepSpeed config for `TrainingArguments(deepspeed=...)`, or None when DeepSpeed is off."""
    return OmegaConf.to_container(cfg.deepspeed, resolve=True) if cfg.deepspeed else None


def lora_target_modules(cfg: DictConfig) -> list[str]:
    """Module names LoRA wraps for `peft.targets` (never the router)."""
    return list(LORA_TARGET_MODULES[cfg.peft.targets])


def lora_modules_to_save(cfg: DictConfig) -> list[str]:
    """Modules trained in full next to the adapters: the router with peft.train_router=true, else none."""
    return list(ROUTER_MODULES) if cfg.peft.train_router else []


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def looks_like_local_path(value: str) -> bool:
    """A path, not a hub name: absolute, relative (./ ../ ~), or ending in a data-file extension."""
    return value.startswith(("/", "./", "../", "~")) or Path(value).suffix in (".jsonl", ".json", ".parquet")


def require_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value} is not supported: choose one of {', '.join(choices)}")


def require_positive(key: str, value: int | float) -> None:
    if value <= 0:
        raise ConfigError(f"{key}={value} must be positive")
